"""Training: fine-tuning and distillation through attention (`deit train`).

    data.py     labelled sets (class folders, CSV/TSV, JSONL; one label or a list), splits, batches
    augment.py  the training transform (crop, flip, RandAugment, erasing) and mixup/cutmix
    recipes.py  the recipes as data: scratch, finetune, plain
    losses.py   the base loss (CE, or BCE for multi-label) and the paper's distillation loss
    loop.py     train(): train_one_epoch, evaluate, checkpoints, the run directory

Nothing here prints or parses flags. `from deit_cli.engine.train.loop import train`.
"""
