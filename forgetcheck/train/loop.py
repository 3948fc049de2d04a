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
through torchrun: train/sharding.py). Speed (train/kernels.py): formula activations swapped for fused ones, and
`--compile`.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forgetcheck import config, console
from forgetcheck.models.files import give_usual_modes
from forgetcheck.models.head import project_at
from forgetcheck.rundir import RunDir
from forgetcheck.schema import read_train, write_train
from forgetcheck.train import arms, checkpoint, kernels, memory, sharding
from forgetcheck.train.optimizer import build_optimizer, check_combination, lr_lambda, optimizer_state_bytes
from forgetcheck.train.packing import IGNORE, Rows, build_rows

# ---- one optimizer step's gradient ------------------------------------------------------------------------

def label_count(labels) -> int:
    """Tokens that carry a loss: the model predicts labels[:, 1:] from the positions before them."""
    return int((labels[:, 1:] != IGNORE).sum())


def micro_batch_loss(model, input_ids, labels, attention_mask, n_label_total: int, autocast) -> object:
    """Summed next-token loss of one micro-batch divided by the label tokens of the WHOLE accumulated batch,
    so that K accumulated micro-batches give exactly the gradient of one batch of K (padding included).

    The vocabulary projection and the cross-entropy run only at the positions that predict a label (`models/head.py` `project_at`):
    an SFT row's prompt tokens and each row's last position cost no [positions, vocab] logits, log-softmax or
    gradient through them, and the projection is the largest matrix of a small model. The loss and gradients
    are the same sum over the same label positions (bench/train_head.py prints each arm's labelled share, the
    speed and the agreement)."""
    import torch.nn.functional as F

    if bool(attention_mask.all()):  # full rows (always, with packing): the plain causal path is faster
        attention_mask = None
    target = labels[:, 1:]
    predicts = F.pad(target != IGNORE, (0, 1), value=False)  # position t predicts labels[:, t + 1]
    with project_at(model, predicts) as head, autocast():
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


# ---- the loop: setup, step, finish ---------------------------------------------------------------------------

def tokens_per_step(cfg: config.TrainConfig) -> int:
    return cfg.seq_len * cfg.micro_batch * cfg.grad_accum * cfg.nproc


def optimizer_steps(cfg: config.TrainConfig) -> int:
    return cfg.budget_tokens // tokens_per_step(cfg)


def rows_per_step(cfg: config.TrainConfig) -> int:
    return cfg.micro_batch * cfg.grad_accum * cfg.nproc


@dataclass
class Training:
    """One arm's training on one process of `world`, as `setup` leaves it: what `step` advances and `finish`
    saves. `state` is what a resume state keeps (step, loss and lr curves, token counts); the fields after it
    belong to this session only (a resumed arm counts its own speed)."""

    label: str
    arm: str
    cfg: config.TrainConfig
    run: RunDir
    model_ref: object
    data_path: Path
    device: str
    rank: int
    world: int
    steps: int
    memory_plan: dict
    model: object
    tok: object
    arm_info: dict
    optimizer: object
    scheduler: object
    scaler: object
    autocast: Callable
    rows: Rows
    resume_dir: Path
    curve: object
    state: dict
    started: float = 0.0
    session_tokens: int = 0
    step_s: list[float] = field(default_factory=list)
    measured_components: dict | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that speaks and writes the run's files."""
        return self.rank == 0

    def say(self, text: str) -> None:
        if self.main:
            console.detail(text)


def train_loop(label: str, model_ref, data_path: Path, cfg: config.TrainConfig, run: RunDir, *, device: str = "cpu",
               rank: int = 0, world: int = 1, hybrid_nodes: int = 0, on_step: Callable[[int], None] | None = None,
               domain=None, tasks_dir: Path | None = None) -> dict | None:
    """Train one arm (one process of `world`); rank 0 writes the checkpoint and train/<label>.json and
    returns the record. `label` is the arm, or one of its `--seeds` runs (`<arm>_s<i>`: seed and data
    order shifted by i). `on_step(step)` is called after every optimizer step (tests use it to interrupt).
    With cfg.eval_every the forgetting curve is measured on the way (train/curve.py: `domain` gives its
    held-out text, `tasks_dir` the retention tasks its items come from) and may stop the arm early."""
    training = setup(label, model_ref, data_path, cfg, run, device=device, rank=rank, world=world,
                     hybrid_nodes=hybrid_nodes, domain=domain, tasks_dir=tasks_dir)
    while training.state["step"] < training.steps:
        stop = step(training)
        if on_step is not None:
            on_step(training.state["step"])
        if stop:
            break
    return finish(training, wall=time.perf_counter() - training.started)


# -- setup: everything before the first step, in the order that keeps runs reproducible

def setup(label: str, model_ref, data_path: Path, cfg: config.TrainConfig, run: RunDir, *, device: str, rank: int,
          world: int, hybrid_nodes: int, domain, tasks_dir: Path | None) -> Training:
    """The memory plan (refused before anything is loaded when it does not fit), the model with the arm's
    techniques, its optimizer, the rows, the curve's reference on the base and the resumed state."""
    from forgetcheck.device import choose_precision, reset_peak_memory
    from forgetcheck.train.curve import CurveTracker

    arm, cfg = config.seed_run_config(label, cfg)
    say = console.detail if rank == 0 else (lambda *a, **k: None)
    steps = optimizer_steps(cfg)
    plan = _memory_plan(arm, cfg, model_ref, device, say)
    _set_seed(cfg.seed)  # before the model is built: LoRA's adapters are initialised from it
    dtypes = choose_precision(cfg.precision, device)
    say(f"precision: {dtypes.reason}")
    model, tok, arm_info = _load_model(arm, cfg, model_ref, device, world=world, hybrid_nodes=hybrid_nodes)
    adamw, scheduler, scaler = _optimizer(arm, cfg, model, steps)
    rows = build_rows(arm, tok, data_path, cfg, steps * rows_per_step(cfg))
    rdir = checkpoint.resume_dir(run, label)
    curve = CurveTracker(label, cfg, run, total_steps=steps, tokens_per_step=tokens_per_step(cfg), world=world,
                         domain=domain, tasks_dir=tasks_dir, lr_factor=lr_lambda(steps, cfg))
    training = Training(label=label, arm=arm, cfg=cfg, run=run, model_ref=model_ref, data_path=data_path,
                        device=device, rank=rank, world=world, steps=steps, memory_plan=plan, model=model, tok=tok,
                        arm_info=arm_info, optimizer=adamw, scheduler=scheduler, scaler=scaler,
                        autocast=_autocast(dtypes, device), rows=rows, resume_dir=rdir, curve=curve,
                        state=_resume(rdir, cfg, curve, model, tok, adamw, scheduler, scaler, world=world, rank=rank))
    if training.state["step"]:  # a saved state is never at step 0 (checkpoint.save_resume)
        say(f"resumed {label} from step {training.state['step']} of {steps} ({rdir})")
    say(f"training {label}: {steps} optimizer steps x {tokens_per_step(cfg)} tokens "
        f"(budget {cfg.budget_tokens} tokens, seq-len {cfg.seq_len}, micro-batch {cfg.micro_batch}, "
        f"grad-accum {cfg.grad_accum}, nproc {cfg.nproc})")
    reset_peak_memory(device)
    if training.main:
        console.set_total(steps)
        console.advance(training.state["step"])
    training.started = time.perf_counter()
    return training


def _memory_plan(arm: str, cfg: config.TrainConfig, model_ref, device: str, say) -> dict:
    """The plan from the architecture alone, so that a run that would not fit is refused before loading."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_ref.path)
    arch = memory.arch_from_hf_config(hf)
    plan = memory.plan_memory(arch, cfg, arm=arm, hf_config=hf, device=device)
    say(memory.format_plan(plan, memory.plan_memory(arch, memory.baseline(cfg), device=device)))
    say(memory.check_fits(plan, device, cfg.force))
    return plan


def _load_model(arm: str, cfg: config.TrainConfig, model_ref, device: str, *, world: int, hybrid_nodes: int):
    """(model, tokenizer, arm settings): the base with dropout off, the precision and checkpointing asked for,
    the arm's trainable weights, in training mode, sharded over `world` processes."""
    import torch

    from forgetcheck.models import registry

    model, tok = registry.load(model_ref, device=device)
    prepare_for_training(model, checkpointing=cfg.grad_checkpointing)
    if cfg.precision == "bf16-true":
        warnings.warn("--precision bf16-true: pure bf16 weights lose small updates (lr * update below bf16's "
                      "resolution); use bf16-mixed to keep fp32 master weights", stacklevel=2)
        model.to(torch.bfloat16)
    model, arm_info = arms.prepare_model(arm, model, cfg)  # lora: peft adapters; freeze: bottom blocks frozen
    model.train()
    if world > 1:
        sharding.shard_model(model, hybrid_nodes=hybrid_nodes, device=device)
    if cfg.compile:
        kernels.compile_blocks(model)
    return model, tok, arm_info


def prepare_for_training(model, *, checkpointing: bool = False):
    """Every arm's model before its arm's changes: dropout off (the same batch must give the same gradient, the
    module docstring), formula activations fused (train/kernels.py), non-reentrant activation checkpointing when
    asked, training mode. train/activations.py measures a model prepared by this. Returns the model."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    kernels.fuse_activations(model)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _optimizer(arm: str, cfg: config.TrainConfig, model, steps: int):
    """(optimizer, lr scheduler, grad scaler or None): the arm's learning rate on its trainable weights; the
    scaler only for fp16, whose small gradients would underflow without it."""
    import torch

    adamw = build_optimizer(arms.trainable_parameters(model), arms.optimizer_config(arm, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_lambda(steps, cfg))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16-mixed" else None
    return adamw, scheduler, scaler


def _autocast(dtypes, device: str) -> Callable:
    """A context factory for the forward pass: autocast to the precision's compute dtype, or nothing."""
    if not dtypes.autocast_dtype:
        return contextlib.nullcontext
    import torch

    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    amp_dtype = getattr(torch, dtypes.autocast_dtype)

    def autocast():
        return torch.autocast(dev_type, dtype=amp_dtype)

    return autocast


def _resume(rdir: Path, cfg: config.TrainConfig, curve, model, tok, adamw, scheduler, scaler, *, world: int,
            rank: int) -> dict:
    """The state training goes on from: a fresh one, or the one saved in `rdir` with this config. The curve's
    reference is scored first, on the base weights, before a resumed state replaces them."""
    resumed_step = checkpoint.resume_step(rdir, cfg)
    curve.start(model, tok, resumed_step or 0)
    if resumed_step is None:
        return {"step": 0, "loss_curve": [], "lr_curve": [], "tokens": {"forward": 0, "padding": 0, "label": 0}}
    return checkpoint.load_resume(rdir, model, adamw, scheduler, scaler, world=world, rank=rank)


# -- step: one optimizer step and what follows it

def step(training: Training) -> bool:
    """One optimizer step on the next rows: the update, the counts and curves, the progress line, a curve
    point and a resume state when due. True when the curve says the arm should stop here."""
    began = time.perf_counter()
    t, index = training, training.state["step"]
    micro, mask, n_label = _step_batch(t, index)
    loss, lr = _update(t, micro, n_label)
    forward = int(mask.sum())
    t.state["tokens"]["forward"] += forward
    t.state["tokens"]["padding"] += int(mask.numel()) - forward
    t.state["tokens"]["label"] += n_label
    t.state["loss_curve"].append([index + 1, round(loss, 6)])
    t.state["lr_curve"].append([index + 1, lr])
    t.state["step"] = index + 1
    t.session_tokens += forward
    t.step_s.append(round(time.perf_counter() - began, 4))
    _show_progress(t, index, loss)
    stop = t.curve.after_step(t.model, t.tok, t.state["step"], t.state["loss_curve"])
    if t.cfg.save_every and t.state["step"] % t.cfg.save_every == 0 and t.state["step"] < t.steps and not stop:
        checkpoint.save_resume(t.resume_dir, t.model, t.optimizer, t.scheduler, t.scaler, t.state, t.cfg,
                               world=t.world, rank=t.rank)
    return stop


def _step_batch(training: Training, index: int) -> tuple[list[tuple], object, int]:
    """(this process's micro-batches on its device, the attention mask of the whole step's rows, the label
    tokens of the whole step). The rows of a step are ordered accumulation step, then rank, then micro-batch,
    so every rank and accumulation step takes its own slice of the same rows."""
    t, n = training, rows_per_step(training.cfg)
    lo = index * n
    ids = t.rows.input_ids[lo:lo + n]
    labels = t.rows.labels[lo:lo + n]
    mask = t.rows.attention_mask[lo:lo + n]
    micro = []
    for k in range(t.cfg.grad_accum):
        a = (k * t.world + t.rank) * t.cfg.micro_batch
        micro.append(tuple(x[a:a + t.cfg.micro_batch].to(t.device) for x in (ids, labels, mask)))
    return micro, mask, label_count(labels)


def _update(training: Training, micro: list[tuple], n_label: int) -> tuple[float, float]:
    """Forward/backward the micro-batches, clip, step the optimizer and the schedule; (the step's loss summed
    over the ranks, the learning rate the step used)."""
    import torch

    t = training
    # FSDP2 averages gradients over ranks; scale by world so the result is sum / n_label of the joined batch
    loss = accumulate(t.model, micro, n_label, autocast=t.autocast, scale=float(t.world), scaler=t.scaler)
    if t.scaler is not None:
        t.scaler.unscale_(t.optimizer)
    torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.max_grad_norm)
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    if t.measured_components is None:  # after the first step, when gradients and optimizer state exist
        t.measured_components = {
            "weights": _param_bytes(t.model.parameters()),
            "gradients": _param_bytes(p.grad for p in t.model.parameters()),
            "optimizer_state": optimizer_state_bytes(t.optimizer),
        }
    lr = t.scheduler.get_last_lr()[0]
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return sharding.sum_over_ranks(loss, t.world), lr


def _show_progress(training: Training, index: int, loss: float) -> None:
    """The progress bar, and a line every 10 steps and at the last one (rank 0 only)."""
    t = training
    if not t.main:
        return
    elapsed = time.perf_counter() - t.started
    console.advance()
    if index % 10 == 0 or index + 1 == t.steps:
        t.say(f"step {index + 1}/{t.steps}: loss {loss:.4f}, {t.session_tokens / max(elapsed, 1e-9):,.0f} tokens/s")


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


# -- finish: the checkpoint and train/<label>.json

def finish(training: Training, wall: float) -> dict | None:
    """Write the HF checkpoint (every rank takes part under FSDP2), then on rank 0 the record
    train/<label>.json, and drop the resume state. Returns the record on rank 0, None elsewhere."""
    from forgetcheck.device import peak_memory_bytes

    t = training
    train_s = wall - t.curve.session_point_s
    peak, method = peak_memory_bytes(t.device)
    ckpt = t.run.ckpt(t.label)
    model = t.model
    if t.main:
        model = arms.finish_model(t.arm, model, ckpt)  # lora: adapter saved, then merged into the base weights
        if t.arm == "lora":
            give_usual_modes(arms.adapter_dir(ckpt))
    checkpoint.save_hf_checkpoint(model, t.tok, ckpt, t.model_ref, t.label, world=t.world, rank=t.rank)
    if not t.main:
        return None
    record = dict(write_train(t.run.train_json(t.label), _record(t, ckpt, wall, train_s, peak, method)))
    shutil.rmtree(t.resume_dir, ignore_errors=True)
    _say_finished(t, record, ckpt, wall, peak)
    return record


def _record(training: Training, ckpt: Path, wall: float, train_s: float, peak: int | None, method: str) -> dict:
    """train/<label>.json's content (docs/design.md, "The run folder"). Closes the curve (`finish` writes its
    file), so it is built once."""
    t, cfg, plan = training, training.cfg, training.memory_plan
    return {
        "arm": t.label,
        "method": t.arm,
        "seed_run": config.seed_run_of(t.label)[1],
        "base": t.model_ref.name,
        "base_ref": t.model_ref.to_dict(),
        "random_weights": t.model_ref.random_weights,
        "data": str(t.data_path),
        "tokens_seen": t.state["tokens"],
        "budget_tokens": cfg.budget_tokens,
        "tokens_per_step": tokens_per_step(cfg),
        "optimizer_steps": t.state["step"],
        "planned_steps": t.steps,
        "stopped_early": t.curve.stopped,
        "curve": t.curve.finish(train_s),
        "loss_curve": t.state["loss_curve"],
        "lr_curve": t.state["lr_curve"],
        "wall_s": round(wall, 3),
        "tokens_per_s": round(t.session_tokens / train_s, 2) if train_s > 0 else None,
        "step_s": t.step_s,
        "memory": {
            "planned": {**plan["per_device"], "total": plan["per_device_total"]},
            "measured_components": t.measured_components,
            "measured_peak_bytes": peak,
            "method": method,
            "note": "planned and measured_components are per device (rank 0); the peak is rank 0's process",
        },
        "packing": "wrapped: examples concatenated with their own label masks, cut into full seq_len rows",
        "arm_settings": t.arm_info,
        **({"replay": t.rows.replay} if t.rows.replay is not None else {}),
        "config": json.loads(json.dumps(config.to_dict(cfg))),  # as read back from train/<arm>.json
        "checkpoint": str(ckpt),
    }


def _say_finished(training: Training, record: dict, ckpt: Path, wall: float, peak: int | None) -> None:
    """The arm's summary: a detail line, and the stage's closing line on the console."""
    t, plan = training, training.memory_plan
    final_loss = record["loss_curve"][-1][1] if record["loss_curve"] else float("nan")
    t.say(f"{t.label}: {t.state['step']} steps, {t.state['tokens']['forward']} tokens, final loss "
          f"{final_loss:.4f}, {wall:.1f} s; checkpoint {ckpt}")
    console.note(f"{t.state['step']} steps, final loss {final_loss:.4f}, "
                 f"{record['tokens_per_s']} tokens/s; memory peak {(peak or 0) / 1e9:.2f} GB, planned "
                 f"{plan['per_device_total'] / 1e9:.2f} GB (weights+grads+optim "
                 f"{plan['states_bytes'] / 1e9:.2f} GB)" + _curve_note(record.get("curve")))


def _curve_note(curve: dict | None) -> str:
    """The forgetting curve's cost on the stage's closing line (`run`'s console shows one line per stage)."""
    frac = ((curve or {}).get("overhead") or {}).get("fraction")
    return "" if frac is None else f"; curve {curve['points']} points, {frac:.0%} extra time"


def _data_path(label: str, domain) -> Path:
    from forgetcheck.data.domain import arm_problems

    arm = config.seed_run_of(label)[0]
    config.check(arm_problems(domain, (arm,)))
    return Path(getattr(domain, config.ARM_DATA[arm]))


def validate(label: str, cfg: config.TrainConfig, device: str, nnodes: int = 1) -> None:
    """Every problem with this training request, raised at once before anything heavy starts: the commands
    checked it already (cli/inputs.py); a library caller gets the same rules from their homes."""
    arm = (config.seed_run_of(label)[0],)
    per_node = None if nnodes == 1 else cfg.nproc // nnodes
    config.check(config.validate_arms(arm, flag="--arms", trained=True) + config.validate_train(cfg)
                 + config.validate_arm_training(arm, cfg) + check_combination(cfg, device, per_node))


def reusable(run: RunDir, label: str, cfg: config.TrainConfig) -> dict | None:
    """The existing record when train/<label>.json and its checkpoint are there for this same config."""
    if not (run.train_json(label).exists() and (run.ckpt(label) / "config.json").exists()):
        return None
    _, cfg = config.seed_run_config(label, cfg)
    record = dict(read_train(run.train_json(label)))
    if json.loads(json.dumps(record.get("config"))) != json.loads(json.dumps(config.to_dict(cfg))):
        return None
    return record


def train_arm(arm: str, model_ref, domain, cfg: config.TrainConfig, run: RunDir, *, device: str = "cpu",
              on_step: Callable[[int], None] | None = None, how=None, tasks_dir: Path | None = None) -> dict | None:
    """Train `arm` (or its seed-run label `<arm>_s<i>`, config.seed_run_label) of `run` on `domain` from
    `model_ref`; writes run.train_json(arm) and run.ckpt(arm) and
    returns the record. Reuses a finished arm; resumes an interrupted one from run.ckpt(arm)/../<arm>.resume/.
    With cfg.nproc > 1 the loop runs under torchrun (FSDP2): launched here (`how`: a sharding.Launch, for
    several nodes), or, when this process is already one rank of an external launcher (torchrun, srun), run
    here as that rank. Returns None on every process but global rank 0 (which writes the run's files)."""
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

        config.check(sharding.launcher_problems(cfg.nproc, ext))
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
