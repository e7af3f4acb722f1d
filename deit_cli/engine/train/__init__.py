"""Training: fine-tuning and distillation through attention (`deit train`).

    options.py   TrainOptions, Events, the errors, the option checks, what --resume may change
    data.py      labelled sets (class folders, CSV/TSV, JSONL; one label or a list), splits, batches
    augment.py   the training transform (crop, flip, RandAugment, erasing) and mixup/cutmix
    recipes.py   the recipes as data: scratch, finetune, hires, plain
    losses.py    the base loss (CE, or BCE for multi-label) and the paper's distillation loss
    student.py   the model to train and TrainingHeads, the forward training runs
    teacher.py   the teacher: a deit source, or torchvision / timm with a state dict
    optim.py     AdamW's parameter groups, the learning-rate schedule, the weights' EMA
    validate.py  validation during training (the raw model, and the EMA)
    run_dir.py   the run directory: checkpoints, saved models, metrics.jsonl
    report.py    --report-to tensorboard: the curves, appended exactly on resume
    loader.py    TrainLoader: decoding and augmentation in worker processes or threads
    step.py      Stepper: one optimizer step, and the one exchange per step all ranks agree on
    stop.py      Stop: Ctrl-C and SIGTERM stop the run at a step boundary
    loop.py      train(): the set-up and the loop alone

Nothing here prints or parses flags. `from deit_cli.engine.train.loop import train`.
"""
