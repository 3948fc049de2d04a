"""`forgetcheck train`: full fine-tuning, one plain PyTorch loop for every arm (nanoGPT / LitGPT spirit).

An arm changes only the data and the label mask (train/packing.py: `sft` pairs with the prompt masked, `cpt` raw
text, `replay` SFT with general text mixed in) and which weights train (train/arms.py: `lora`, `freeze`). Every row
of every arm is full (train/packing.py's wrapped packing), so all arms
feed exactly seq_len * micro_batch * grad_accum * nproc tokens per optimizer step: with
steps = budget_tokens // tokens_per_step, their tokens_seen["forward"] are equal (and within one step of the
budget), and they take the same optimizer steps. The loss is normalised by the label tokens of the whole
accumulated batch (all micro-batches and ranks), so grad-accum K x micro 1 gives the gradient of 1 x K, padded
rows included. Rows are built in a fixed order from `data_seed` (the data is reshuffled each epoch), so the
data position of a resumed run is just the step number.

Dropout is switched off while training (as LitGPT and Llama-style configs do): the same batch must give the
same gradient, which the exact checks (accumulation, sharding, resume) rely on.

Memory techniques (see train/memory.py): precision, grad_accum, grad_checkpointing, optim (8-bit AdamW), nproc (FSDP2
through torchrun: train/sharding.py).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from forgetcheck import config
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir
from forgetcheck.schema import read_train, write_train
from forgetcheck.train.packing import IGNORE, build_rows

# ---- one optimizer step's gradient ------------------------------------------------------------------------

def label_count(labels) -> int:
    """Tokens that carry a loss: the model predicts labels[:, 1:] from the positions before them."""
    return int((labels[:, 1:] != IGNORE).sum())


@contextlib.contextmanager
def _head_at(model, positions):
    """While active, the model's output projection (`get_output_embeddings()`) sees only the hidden states at
    `positions` (a [batch, seq] bool mask): it returns logits [n, vocab] for those n positions instead of
    [batch, seq, vocab]. Whatever the model does after the projection (a logit scale, a soft cap) is
    elementwise and applies unchanged. Yields a dict whose "fired" says whether the projection ran through the
    hook (a model that computes its logits another way gets its full logits, and the caller falls back)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    state = {"fired": False}
    if head is None:
        yield state
        return

    def pick(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != positions.shape:
            return None  # not the call we expect (already sliced, another shape): leave it alone
        state["fired"] = True
        picked = hidden[positions]
        return ((picked, *args[1:]), kwargs) if args else (args, {**kwargs, "input": picked})

    handle = head.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def micro_batch_loss(model, input_ids, labels, attention_mask, n_label_total: int, autocast) -> object:
    """Summed next-token loss of one micro-batch divided by the label tokens of the WHOLE accumulated batch,
    so that K accumulated micro-batches give exactly the gradient of one batch of K (padding included).

    The vocabulary projection and the cross-entropy run only at the positions that predict a label (`_head_at`):
    an SFT row's prompt tokens (about two thirds of the med rows) and each row's last position cost no
    [positions, vocab] logits, log-softmax or gradient through them. The loss and gradients are the same sum
    over the same label positions (bench/train_head.py measures the speed and the agreement)."""
    import torch.nn.functional as F

    if bool(attention_mask.all()):  # full rows (always, with packing): the plain causal path is faster
        attention_mask = None
    target = labels[:, 1:]
    predicts = F.pad(target != IGNORE, (0, 1), value=False)  # position t predicts labels[:, t + 1]
    with _head_at(model, predicts) as head, autocast():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if head["fired"] and logits.dim() == 2:
        loss_sum = F.cross_entropy(logits.float(), target[target != IGNORE], reduction="sum")
    else:  # the model's logits did not come through its output embeddings: score all positions
        logits = logits[:, :-1].float()
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
    return loss_sum / max(1, n_label_total)


def accumulate(model, micro_batches: list[tuple], n_label_total: int, *, autocast=contextlib.nullcontext,
               scale: float = 1.0, scaler=None) -> float:
    """Forward/backward every micro-batch (input_ids, labels, attention_mask) into .grad; returns the
    loss (sum over the micro-batches, per label token of the whole batch)."""
    total = 0.0
    for input_ids, labels, attention_mask in micro_batches:
        loss = micro_batch_loss(model, input_ids, labels, attention_mask, n_label_total, autocast)
        scaled = loss * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += float(loss.detach())
    return total


# ---- the loop ---------------------------------------------------------------------------------------------

def tokens_per_step(cfg: config.TrainConfig) -> int:
    return cfg.seq_len * cfg.micro_batch * cfg.grad_accum * cfg.nproc


def optimizer_steps(cfg: config.TrainConfig) -> int:
    return cfg.budget_tokens // tokens_per_step(cfg)


def _param_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def train_loop(label: str, model_ref, data_path: Path, cfg: config.TrainConfig, run: RunDir, *, device: str = "cpu",
               rank: int = 0, world: int = 1, hybrid_nodes: int = 0, on_step: Callable[[int], None] | None = None,
               domain=None, tasks_dir: Path | None = None) -> dict | None:
    """Train one arm (one process of `world`); rank 0 writes the checkpoint and train/<label>.json and
    returns the record. `label` is the arm, or one of its `--seeds` replicas (`<arm>_s<i>`: seed and data
    order shifted by i). `on_step(step)` is called after every optimizer step (tests use it to interrupt).
    With cfg.eval_every the forgetting curve is measured on the way (train/curve.py: `domain` gives its
    held-out text, `tasks_dir` the retention tasks its items come from) and may stop the arm early."""
    import torch

    from forgetcheck import console
    from forgetcheck.device import choose_precision, peak_memory_bytes, reset_peak_memory
    from forgetcheck.models import registry
    from forgetcheck.train import arms, checkpoint, memory, sharding
    from forgetcheck.train import curve as training_curve
    from forgetcheck.train import optimizer as optim

    arm, cfg = config.replica_config(label, cfg)
    main = rank == 0
    say = console.detail if main else (lambda *a, **k: None)
    steps = optimizer_steps(cfg)
    rows_per_step = cfg.micro_batch * cfg.grad_accum * cfg.nproc

    # the memory plan, from the architecture alone: refuse before loading anything that would not fit
    from transformers import AutoConfig

    arch = memory.arch_from_hf_config(AutoConfig.from_pretrained(model_ref.path))
    mem_plan = memory.plan_memory(arch, cfg, arm=arm, hf_config=AutoConfig.from_pretrained(model_ref.path))
    say(memory.format_plan(mem_plan, memory.plan_memory(arch, memory.baseline(cfg))))
    say(memory.check_fits(mem_plan, device, cfg.force))

    # model, precision, techniques
    _set_seed(cfg.seed)
    dtypes = choose_precision(cfg.precision, device)
    say(f"precision: {dtypes.reason}")
    model, tok = registry.load(model_ref, device=device)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if cfg.precision == "bf16-true":
        warnings.warn("--precision bf16-true: pure bf16 weights lose small updates (lr * update below bf16's "
                      "resolution); use bf16-mixed to keep fp32 master weights", stacklevel=2)
        model.to(torch.bfloat16)
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, arm_info = arms.prepare_model(arm, model, cfg)  # lora: peft adapters; freeze: bottom blocks frozen
    model.train()
    if world > 1:
        sharding.shard_model(model, hybrid_nodes=hybrid_nodes, device=device)
    optimizer = optim.build_optimizer(arms.trainable_parameters(model), arms.optimizer_config(arm, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_lambda(steps, cfg))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16-mixed" else None
    if dtypes.autocast_dtype:
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        amp_dtype = getattr(torch, dtypes.autocast_dtype)

        def autocast():
            return torch.autocast(dev_type, dtype=amp_dtype)
    else:
        autocast = contextlib.nullcontext

    rows = build_rows(arm, tok, data_path, cfg, steps * rows_per_step)

    # resume
    state = {"step": 0, "loss_curve": [], "lr_curve": [], "tokens": {"forward": 0, "padding": 0, "label": 0}}
    rdir = checkpoint.resume_dir(run, label)
    resumed_step = checkpoint.resume_step(rdir, cfg)
    tracker = training_curve.CurveTracker(label, cfg, run, total_steps=steps, tokens_per_step=tokens_per_step(cfg),
                                          world=world, domain=domain, tasks_dir=tasks_dir,
                                          lr_factor=optim.lr_lambda(steps, cfg))
    tracker.start(model, tok, resumed_step or 0)  # on the base
    if resumed_step is not None:
        state = checkpoint.load_resume(rdir, model, optimizer, scheduler, scaler, world=world, rank=rank)
        say(f"resumed {label} from step {state['step']} of {steps} ({rdir})")

    say(f"training {label}: {steps} optimizer steps x {tokens_per_step(cfg)} tokens "
        f"(budget {cfg.budget_tokens} tokens, seq-len {cfg.seq_len}, micro-batch {cfg.micro_batch}, "
        f"grad-accum {cfg.grad_accum}, nproc {cfg.nproc})")
    reset_peak_memory(device)
    measured_components = None
    if main:
        console.set_total(steps)
        console.advance(state["step"])
    t0 = time.perf_counter()
    session_tokens = 0
    step_s: list[float] = []
    for step in range(state["step"], steps):
        t_step = time.perf_counter()
        lo = step * rows_per_step
        step_ids = rows.input_ids[lo:lo + rows_per_step]
        step_lab = rows.labels[lo:lo + rows_per_step]
        step_mask = rows.attention_mask[lo:lo + rows_per_step]
        n_label = label_count(step_lab)
        micro = []
        for k in range(cfg.grad_accum):  # rows of accumulation step k, then rank, then micro-batch
            a = (k * world + rank) * cfg.micro_batch
            micro.append(tuple(t[a:a + cfg.micro_batch].to(device) for t in (step_ids, step_lab, step_mask)))
        # FSDP2 averages gradients over ranks; scale by world so the result is sum / n_label of the joined batch
        loss = accumulate(model, micro, n_label, autocast=autocast, scale=float(world), scaler=scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if measured_components is None:
            measured_components = {
                "weights": _param_bytes(model.parameters()),
                "gradients": _param_bytes(p.grad for p in model.parameters()),
                "optimizer_state": optim.optimizer_state_bytes(optimizer),
            }
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = sharding.sum_over_ranks(loss, world)
        del grad_norm
        forward = int(step_mask.sum())
        state["tokens"]["forward"] += forward
        state["tokens"]["padding"] += int(step_mask.numel()) - forward
        state["tokens"]["label"] += n_label
        state["loss_curve"].append([step + 1, round(loss, 6)])
        state["lr_curve"].append([step + 1, lr])
        state["step"] = step + 1
        session_tokens += forward
        step_s.append(round(time.perf_counter() - t_step, 4))
        elapsed = time.perf_counter() - t0
        if main:
            console.advance()
            if step % 10 == 0 or step + 1 == steps:
                say(f"step {step + 1}/{steps}: loss {loss:.4f}, {session_tokens / max(elapsed, 1e-9):,.0f} tokens/s")
        stop = tracker.after_step(model, tok, state["step"], state["loss_curve"])
        if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < steps and not stop:
            checkpoint.save_resume(rdir, model, optimizer, scheduler, scaler, state, cfg, world=world, rank=rank)
        if on_step is not None:
            on_step(state["step"])
        if stop:
            break
    wall = time.perf_counter() - t0
    train_s = wall - tracker.session_point_s
    peak, method = peak_memory_bytes(device)

    ckpt = run.ckpt(label)
    if main:
        model = arms.finish_model(arm, model, ckpt)  # lora: adapter saved, then merged into the base weights
    checkpoint.save_hf_checkpoint(model, tok, ckpt, model_ref, label, world=world, rank=rank)
    if not main:
        return None
    record = {
        "arm": label,
        "method": arm,
        "replica": config.replica_of(label)[1],
        "base": model_ref.name,
        "base_ref": model_ref.to_dict(),
        "random_weights": model_ref.random_weights,
        "data": str(data_path),
        "tokens_seen": state["tokens"],
        "budget_tokens": cfg.budget_tokens,
        "tokens_per_step": tokens_per_step(cfg),
        "optimizer_steps": state["step"],
        "planned_steps": steps,
        "stopped_early": tracker.stopped,
        "curve": tracker.finish(train_s),
        "loss_curve": state["loss_curve"],
        "lr_curve": state["lr_curve"],
        "wall_s": round(wall, 3),
        "tokens_per_s": round(session_tokens / train_s, 2) if train_s > 0 else None,
        "step_s": step_s,
        "memory": {
            "planned": {**mem_plan["per_device"], "total": mem_plan["per_device_total"]},
            "measured_components": measured_components,
            "measured_peak_bytes": peak,
            "method": method,
            "note": "planned and measured_components are per device (rank 0); the peak is rank 0's process",
        },
        "packing": "wrapped: examples concatenated with their own label masks, cut into full seq_len rows",
        "arm_settings": arm_info,
        **({"replay": rows.replay} if rows.replay is not None else {}),
        "config": json.loads(json.dumps(config.to_dict(cfg))),  # as read back from train/<arm>.json
        "checkpoint": str(ckpt),
    }
    record = dict(write_train(run.train_json(label), record))
    shutil.rmtree(rdir, ignore_errors=True)
    say(f"{label}: {state['step']} steps, {state['tokens']['forward']} tokens, final loss "
        f"{state['loss_curve'][-1][1] if state['loss_curve'] else float('nan'):.4f}, {wall:.1f} s; "
        f"checkpoint {ckpt}")
    console.note(f"{state['step']} steps, final loss {record['loss_curve'][-1][1] if record['loss_curve'] else float('nan'):.4f}, "
                 f"{record['tokens_per_s']} tokens/s; memory peak {(peak or 0) / 1e9:.2f} GB, planned "
                 f"{mem_plan['per_device_total'] / 1e9:.2f} GB (weights+grads+optim "
                 f"{mem_plan['states_bytes'] / 1e9:.2f} GB)" + _curve_note(record.get("curve")))
    return record


def _curve_note(curve: dict | None) -> str:
    """The forgetting curve's cost on the stage's closing line (`run`'s console shows one line per stage)."""
    frac = ((curve or {}).get("overhead") or {}).get("fraction")
    return "" if frac is None else f"; curve {curve['points']} points, {frac:.0%} extra time"


def _data_path(label: str, domain) -> Path:
    from forgetcheck.data import domain as data

    arm = config.replica_of(label)[0]
    config.check(data.arm_problems(domain, (arm,)))
    return Path(getattr(domain, config.ARM_DATA[arm]))


def validate(label: str, cfg: config.TrainConfig, device: str, nnodes: int = 1) -> None:
    """Every problem with this training request, raised at once before anything heavy starts."""
    from forgetcheck.train import optimizer as optim
    from forgetcheck.train.arms import TRAINED

    arm = config.replica_of(label)[0]
    problems = [] if arm in TRAINED else [f"unknown arm '{arm}' to train: choose from {', '.join(TRAINED)}"]
    if arm == "lora" and cfg.nproc > 1:
        problems.append("--arms lora with --nproc > 1: LoRA under FSDP2 is not supported; use --nproc 1")
    per_node = None if nnodes == 1 else cfg.nproc // nnodes
    config.check(problems + config.validate_train(cfg) + optim.check_combination(cfg, device, per_node))


def reusable(run: RunDir, label: str, cfg: config.TrainConfig) -> dict | None:
    """The existing record when train/<label>.json and its checkpoint are there for this same config."""
    if not (run.train_json(label).exists() and (run.ckpt(label) / "config.json").exists()):
        return None
    _, cfg = config.replica_config(label, cfg)
    record = dict(read_train(run.train_json(label)))
    if json.loads(json.dumps(record.get("config"))) != json.loads(json.dumps(config.to_dict(cfg))):
        return None
    return record


def train_arm(arm: str, model_ref, domain, cfg: config.TrainConfig, run: RunDir, *, device: str = "cpu",
              on_step: Callable[[int], None] | None = None, how=None, tasks_dir: Path | None = None) -> dict | None:
    """Train `arm` (or its replica label `<arm>_s<i>`, config.replica_label) of `run` on `domain` from
    `model_ref`; writes run.train_json(arm) and run.ckpt(arm) and
    returns the record. Reuses a finished arm; resumes an interrupted one from run.ckpt(arm)/../<arm>.resume/.
    With cfg.nproc > 1 the loop runs under torchrun (FSDP2): launched here (`how`: a sharding.Launch, for
    several nodes), or, when this process is already one rank of an external launcher (torchrun, srun), run
    here as that rank. Returns None on every process but global rank 0 (which writes the run's files)."""
    from forgetcheck.train import sharding

    how = how or sharding.Launch()
    validate(arm, cfg, device, how.nnodes)
    record = reusable(run, arm, cfg)
    if record is not None:
        print(f"{arm}: already trained ({run.train_json(arm)}): reused")
        return record
    data_path = _data_path(arm, domain)
    ext = sharding.external_ranks()
    if ext is not None:
        import torch.distributed as dist

        if cfg.nproc != ext["world"]:
            raise BadInput(f"--nproc {cfg.nproc} but the {ext['source']} launcher started {ext['world']} processes: "
                           f"give --nproc {ext['world']} (or leave it out)")
        rank, world, dev = sharding.join_external(device)
        rec = train_loop(arm, model_ref, data_path, cfg, run, device=dev, rank=rank, world=world,
                         hybrid_nodes=how.nnodes if how.hybrid_shard else 0, on_step=on_step)
        dist.barrier()
        return rec if rank == 0 else None
    if cfg.nproc > 1:
        sharding.launch(arm, model_ref, data_path, cfg, run, device, how)
        return dict(read_train(run.train_json(arm))) if how.node_rank == 0 else None
    return train_loop(arm, model_ref, data_path, cfg, run, device=device, on_step=on_step, domain=domain,
                      tasks_dir=tasks_dir)


def _rank_main(spec_path: str) -> None:
    """One torchrun process of `sharding.launch`: join the group, run train_loop with this rank."""
    import torch.distributed as dist

    from forgetcheck.models.registry import ModelRef
    from forgetcheck.train import sharding

    spec = sharding.read_spec(spec_path)
    rank, world, device = sharding.init_rank(spec["device"])
    try:
        train_loop(spec["arm"], ModelRef(**spec["model_ref"]), Path(spec["data_path"]), config.TrainConfig(**spec["cfg"]),
                   RunDir(spec["run"]), device=device, rank=rank, world=world,
                   hybrid_nodes=spec.get("hybrid_nodes", 0), on_step=sharding.crash_hook_for_tests())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    _rank_main(sys.argv[1])
