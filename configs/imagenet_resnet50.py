"""ResNet-50 on ImageNet-1k: 90 epochs, batch 1024, cosine decay.

docs/algorithms.md §6 (published top-1: AdamW 75.61, AdaDiag 75.85,
Hfac 75.90). Inception-style crop + horizontal flip at 224², center crop
(224/0.875) for evaluation. [decided] where the papers are silent: 5 warmup
epochs (``warmup_fraction`` 5/90), label smoothing 0.1, weight decay 0.05 on
conv/dense kernels only, peak learning rate 1e-3 (sweep it per optimizer).

    python scripts/train.py --config=configs/imagenet_resnet50.py \\
        --workdir=DIR --config.data.data_dir=/path/to/imagenet \\
        --config.optimizer=hfac

Data: ``data.data_dir`` = a folder ``train/<class>/*.JPEG`` and
``validation/<class>/*.JPEG``, or ``data.source='tfds'`` with a prepared
TFDS ``imagenet2012`` (ArrayRecord) in ``data.data_dir``.
"""

import ml_collections

TRAIN_IMAGES = 1_281_167


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name='resnet', size='50', num_classes=1000, dtype='bfloat16'))
  config.data = ml_collections.ConfigDict(dict(
      name='imagenet', source='folder', data_dir='', train_split='train',
      eval_split='validation', image_size=224, crop='inception', flip=True,
      randaugment=None, mixup_alpha=0.0, normalize='imagenet',
      num_workers=32, prefetch=2, eval_batches=None))
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.microbatches = 1
  config.num_epochs = 90
  config.num_train_steps = 0      # 0: from num_epochs
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.optimizer_kwargs = ml_collections.ConfigDict()
  config.weight_decay = 0.05
  config.weight_decay_exclude = ('bias', 'scale')
  config.method_exclude = ()
  config.grad_clip = None
  config.label_smoothing = 0.1
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_fraction=5 / 90, decay='cosine', final_fraction=0.0))
  config.log_every_steps = 10
  config.flush_every_steps = 100
  config.eval_every_steps = TRAIN_IMAGES // 1024 * 5   # every 5 epochs
  config.checkpoint_every_steps = TRAIN_IMAGES // 1024
  config.max_checkpoints = 2
  return config
