"""Training throughput of `deit train`'s step beside timm's train.py step, in one run.

    PYTHONPATH=. python benchmarks/train_throughput.py [--batch 64] [--steps 3] [--reps 3]

Both sides train deit-tiny-distilled (random init, no download) with hard distillation
from the same teacher (a random deit-tiny, the same weights), on the same batch, in the same dtype
(bf16 autocast where the CPU has native bf16, fp32 otherwise; --dtype to choose):

- deit: `deit_cli.engine.train.loop._step`, the function `deit train` runs each step
  (our DeiT through TrainingHeads; the teacher on the inference engine's fast path, as
  `--teacher` with a deit source runs it; DistillationLoss; fused AdamW with the release's
  decay groups; zero_grad(set_to_none=True));
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


def deit_step_fn(student_sd, teacher_sd, batch_size: int, amp_dtype, device):
    from deit_cli.engine.runner import prepare
    from deit_cli.engine.train import loop
    from deit_cli.engine.train.augment import Mixup
    from deit_cli.engine.train.data import TrainBatch
    from deit_cli.engine.train.losses import DistillationLoss, base_loss
    from deit_cli.engine.train.recipes import PLAIN
    from deit_cli.model import DeiT
    from deit_cli.variants import find_variant

    # the same teacher (timm's deit-tiny, the same weights) as our DeiT, on the inference
    # engine's fast path, as `deit train --teacher <deit source>` runs it
    teacher_net = DeiT(find_variant("deit-tiny").config)
    teacher_net.load_state_dict(teacher_sd)
    teacher_net.to(device).eval().requires_grad_(False)
    fast = prepare(teacher_net, device=device, dtype=amp_dtype or torch.float32)
    variant = find_variant("deit-tiny-distilled")
    model = DeiT(variant.config)
    model.load_state_dict(student_sd)
    model.preprocessing = variant.preprocessing
    model.to(device).train().requires_grad_(True)
    recipe = replace(PLAIN, batch_size=batch_size, lr=5e-4)
    opts = loop.TrainOptions(data="", run_dir=None, recipe=recipe, teacher="bench")
    run = loop._Run(
        opts,
        recipe,
        model,
        loop.TrainingHeads(model),
        loop.Teacher(teacher_net, variant.preprocessing, None, fast),
        DistillationLoss(base_loss(soft_targets=False, smoothing=0.0), "hard", 0.5, 1.0),
        torch.optim.AdamW(loop.param_groups(model, 0.05), lr=5e-4, fused=True),
        torch.amp.GradScaler(device.type, enabled=False),
        None,
        Mixup(0, 0, 0.5, 0, 1000),
        device,
        amp_dtype,
        None,
        None,
        1,
        0,
        1,
        loop._StopFlag(),
        loop.Events(),
    )

    def step(x, y):
        loop._step(run, TrainBatch(0, x, y, []), 0)

    return step


def timm_step_fn(student_sd, teacher_net, amp_dtype, device):
    import timm
    from timm.optim import create_optimizer_v2
    from timm.task import TokenDistillationTask

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
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
    ap.add_argument("--compile", action="store_true", help="torch.compile both students")
    args = ap.parse_args()

    import timm

    device = torch.device(args.device)
    if args.dtype == "auto":
        native = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        args.dtype = "bf16" if native else "fp32"
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    student_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    teacher = timm.create_model("deit_tiny_patch16_224", pretrained=False).to(device).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    teacher_sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    steps = {
        "deit": deit_step_fn(student_sd, teacher_sd, args.batch, amp_dtype, device),
        "timm": timm_step_fn(student_sd, teacher, amp_dtype, device),
    }
    if args.compile:
        print("note: --compile compiles the step functions' models lazily on the warm-up step")
    print(
        f"deit-tiny-distilled, hard distillation (teacher: deit-tiny), batch {args.batch}, {args.dtype}, "
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
