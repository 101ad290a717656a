"""ViT-S/16 on ImageNet-1k: 300 epochs, batch 4096, 10k warmup + linear decay.

docs/algorithms.md §6 (published top-1: AdamW 78.35, AdaDiag 79.18,
Hfac 77.20), with the AugReg "medium" augmentation the papers name:
RandAugment(2, 15) and mixup (α = 0.5), Inception crop + flip at 224².
[decided] where the papers are silent: peak learning rate 1e-3, weight decay
0.1 on kernels, global-norm clipping 1.0 (AugReg's values).

    python scripts/train.py --config=configs/imagenet_vit_s16.py \\
        --workdir=DIR --config.data.data_dir=/path/to/imagenet \\
        --config.optimizer=adadiag --config.microbatches=4
"""

import ml_collections

TRAIN_IMAGES = 1_281_167


def get_config(size='s16'):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      name='vit', size=size, num_classes=1000, image_size=224, dropout=0.0,
      dtype='bfloat16'))
  config.data = ml_collections.ConfigDict(dict(
      name='imagenet', source='folder', data_dir='', train_split='train',
      eval_split='validation', image_size=224, crop='inception', flip=True,
      randaugment=(2, 15), mixup_alpha=0.5, normalize='imagenet',
      num_workers=32, prefetch=2, eval_batches=None))
  config.batch_size = 4096
  config.eval_batch_size = 1000
  config.microbatches = 1
  config.num_epochs = 300
  config.num_train_steps = 0      # 0: from num_epochs
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.optimizer_kwargs = ml_collections.ConfigDict()
  config.weight_decay = 0.1
  config.weight_decay_exclude = ('bias', 'scale', 'cls_token', 'pos_embed')
  config.method_exclude = ()
  config.grad_clip = 1.0
  config.label_smoothing = 0.0
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=10_000, decay='linear', final_fraction=0.0))
  config.log_every_steps = 10
  config.flush_every_steps = 100
  config.eval_every_steps = TRAIN_IMAGES // 4096 * 10   # every 10 epochs
  config.checkpoint_every_steps = TRAIN_IMAGES // 4096 * 2
  config.max_checkpoints = 2
  return config
