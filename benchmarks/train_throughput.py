"""Training throughput of `deit train`'s step beside timm's train.py step, in one run.

    PYTHONPATH=. python benchmarks/train_throughput.py [--batch 64] [--steps 3] [--reps 3]
    PYTHONPATH=. python benchmarks/train_throughput.py --device cuda --batch 256 --steps 20 --reps 5

Both sides train the same student (random init, no download; deit-small-distilled on CUDA,
deit-tiny-distilled elsewhere) with hard distillation from the same deit teacher (the same
weights), on the same batch, in the same dtype (bf16 autocast on CUDA and where the CPU has
native bf16, fp32 otherwise; --dtype to choose):

- deit: `deit_cli.engine.train.step.Stepper.step`, what `deit train` runs each step
  (our DeiT through TrainingHeads; the teacher on the inference engine's fast path, as
  `--teacher` with a deit source runs it; DistillationLoss; fused AdamW with the release's
  decay groups; zero_grad(set_to_none=True)), reading the loss every 20 steps on CUDA as
  `deit train`'s default --log-every does;
- timm: what timm's train.py (1.0.23+) does per step with `--distill-type hard`:
  `TokenDistillationTask(model, teacher)` under autocast, loss.backward(),
  `create_optimizer_v2(model, "adamw")`'s step, optimizer.zero_grad(), loss.item().

Reps alternate between the two (so a busy machine slows both alike); each rep times
--steps steps after one warm-up step. Prints images/s per rep, the medians and the ratio;
and the same per CPU-second of this process, which a machine shared with other work
disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch


def deit_step_fn(student_name, teacher_name, student_sd, teacher_sd, amp_dtype, device):
    from deit_cli.engine.runner import prepare
    from deit_cli.engine.train.augment import Mixup
    from deit_cli.engine.train.step import Stepper
    from deit_cli.engine.train.losses import DistillationLoss, base_loss
    from deit_cli.engine.train.optim import build_optimizer
    from deit_cli.engine.train.recipes import PLAIN
    from deit_cli.engine.train.student import TrainingHeads
    from deit_cli.engine.train.teacher import Teacher
    from deit_cli.model import DeiT
    from deit_cli.variants import find_variant

    # the same teacher (timm's weights) as our DeiT, on the inference engine's fast path,
    # as `deit train --teacher <deit source>` runs it
    teacher_net = DeiT(find_variant(teacher_name).config)
    teacher_net.load_state_dict(teacher_sd)
    teacher_net.to(device).eval().requires_grad_(False)
    fast = prepare(teacher_net, device=device, dtype=amp_dtype or torch.float32)
    variant = find_variant(student_name)
    model = DeiT(variant.config)
    model.load_state_dict(student_sd)
    model.preprocessing = variant.preprocessing
    model.to(device).train().requires_grad_(True)
    recipe = replace(PLAIN, lr=5e-4, weight_decay=0.05)
    stepper = Stepper(
        TrainingHeads(model),
        model,
        Teacher(teacher_net, variant.preprocessing, None, fast),
        DistillationLoss(base_loss(soft_targets=False, smoothing=0.0), "hard", 0.5, 1.0),
        build_optimizer(model, recipe, device),
        torch.amp.GradScaler(device.type, enabled=False),
        None,
        Mixup(0, 0, 0.5, 0, 1000),
        device=device,
        amp_dtype=amp_dtype,
        grad_accum=1,
        clip_grad=None,
        world=1,
    )
    count = [0]

    def step(x, y):
        stepper.step(x, y, x.shape[0], 0, count[0])
        count[0] += 1
        # `deit train` reads the loss every --log-every steps (20 on a GPU), not every step
        stepper.exchange([], read=count[0] % (20 if device.type == "cuda" else 1) == 0)

    return step


def timm_step_fn(student_name, student_sd, teacher_net, amp_dtype, device):
    import timm
    from timm.optim import create_optimizer_v2
    from timm.task import TokenDistillationTask

    model = timm.create_model(student_name, pretrained=False)
    model.load_state_dict(student_sd)
    model.to(device).train()
    task = TokenDistillationTask(
        model,
        teacher_net,
        criterion=torch.nn.CrossEntropyLoss(),
        distill_type="hard",
        task_loss_weight=0.5,
        device=device,
        verbose=False,
    )
    task.train()
    optimizer = create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    ctx = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype))
        if amp_dtype
        else (lambda: torch.autocast(device.type, enabled=False))
    )

    def step(x, y):
        with ctx():
            loss = task(x, y)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--student", help="default: deit_small_distilled_patch16_224 on CUDA, the tiny one elsewhere")
    ap.add_argument("--teacher", help="default: deit_small_patch16_224 on CUDA, deit_tiny_patch16_224 elsewhere")
    ap.add_argument("--compile", action="store_true", help="torch.compile both students")
    args = ap.parse_args()

    import timm

    device = torch.device(args.device)
    if args.dtype == "auto":
        native = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        args.dtype = "bf16" if native else "fp32"
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    torch.manual_seed(0)
    size = "small" if device.type == "cuda" else "tiny"
    student_name = args.student or f"deit_{size}_distilled_patch16_224"
    teacher_name = args.teacher or f"deit_{size}_patch16_224"
    ref = timm.create_model(student_name, pretrained=False)
    student_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    teacher = timm.create_model(teacher_name, pretrained=False).to(device).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    teacher_sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    steps = {
        "deit": deit_step_fn(student_name, teacher_name, student_sd, teacher_sd, amp_dtype, device),
        "timm": timm_step_fn(student_name, student_sd, teacher, amp_dtype, device),
    }
    if args.compile:
        print("note: --compile compiles the step functions' models lazily on the warm-up step")
    print(
        f"{student_name}, hard distillation (teacher: {teacher_name}), batch {args.batch}, {args.dtype}, "
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}"
    )
    rates: dict[str, list[float]] = {k: [] for k in steps}
    cpu_rates: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps):
        for name, step in steps.items():
            step(x, y)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates[name].append(args.batch * args.steps / wall)
            cpu_rates[name].append(args.batch * args.steps / cpu)
            print(
                f"rep {rep + 1}  {name}: {rates[name][-1]:8.2f} images/s   "
                f"{cpu_rates[name][-1]:8.2f} images per CPU-second"
            )
    for what, table in (("images/s", rates), ("images per CPU-second", cpu_rates)):
        med = {k: statistics.median(v) for k, v in table.items()}
        print(
            f"median {what}  deit: {med['deit']:.2f}   timm: {med['timm']:.2f}   "
            f"ratio deit/timm: {med['deit'] / med['timm']:.3f}"
        )


if __name__ == "__main__":
    main()
