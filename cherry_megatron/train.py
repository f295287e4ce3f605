"""Train a model under DeepSpeed with megatron-core tensor parallelism.

    python -m cherry_megatron.train --config PRESET_OR_YAML --run-dir DIR [--set key=value ...]

Launch it with torchrun, deepspeed or srun (world size from the environment), or as one process.
The run dir holds config.yaml, metrics.jsonl, tensorboard/ and checkpoints/; starting again with the
same run dir resumes from checkpoints/latest with the same data order.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cherry_megatron import compat, distributed, faults, losses, sgt
from cherry_megatron.checkpoint import run_lock
from cherry_megatron.checkpoint.consolidate import load_into
from cherry_megatron.checkpoint.run_dir import atomic_write_text, checkpoint_dir, latest_tag, write_config
from cherry_megatron.config import Config
from cherry_megatron.convert.load import load_consolidated
from cherry_megatron.data.gpt_data import TrainData
from cherry_megatron.data.indexed import token_stream
from cherry_megatron.distill import Teacher
from cherry_megatron.engine import (build_engine, compute_dtype, freeze_except, partitioned_build,
                                    resolve_precision)
from cherry_megatron.errors import CheckpointError, TrainingError, cli_errors
from cherry_megatron.evaluate import window_loss, windows
from cherry_megatron.metrics import MetricsLogger, base_memory_gib, memory_gib, peak_tflops, returning_freed_memory
from cherry_megatron.model import build_model, compile_blocks, parameter_count, training_flops_per_token
from cherry_megatron.model.gpt import flops_per_token
from cherry_megatron.model.pipeline import build_pipeline, eval_sums, local_blocks_only, pipe_batch, train_loss
from cherry_megatron.preflight import preflight


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, layout: distributed.Layout, tokenizer):
        self.cfg, self.run_dir, self.layout = cfg, run_dir, layout
        self.base_memory = base_memory_gib(layout.device)  # before any weight exists
        self.dp_group = parallel_state.get_data_parallel_group()
        torch.manual_seed(cfg.train.seed)  # same seed on every rank: TP slices of one master weight
        # ZeRO-3: each rank keeps only its partition of every weight, as soon as the weight's module is built.
        self.pipeline = cfg.parallel.pp > 1
        topology = distributed.topology(cfg.parallel, layout.world) if self.pipeline else None
        with returning_freed_memory(), (local_blocks_only(cfg, topology, layout.rank) if self.pipeline
                                        else contextlib.nullcontext()):
            model = partitioned_build(lambda: build_model(cfg), cfg, layout.dp, layout.device, self.dp_group)
        built = self.memory()
        self.model_memory = built["peak_memory_gib"] - built["base_memory_gib"]  # the build's own peak
        if cfg.model.init_from:
            state = load_consolidated(cfg.model.init_from)[0]
            # MTP modules added to a model trained without them start from their initialisation.
            fresh = ("mtp.",) if cfg.moee.mtp_depth and not any(k.startswith("mtp.") for k in state) else ()
            load_into(model, state, f"model.init_from={cfg.model.init_from}", fresh, self.dp_group)
        trainable = freeze_except(model, cfg.train.trainable, cfg.parallel.zero_stage) if cfg.train.trainable else None
        if cfg.train.compile:
            compile_blocks(model)
        if self.pipeline:
            distributed.check_topology(topology)
            model = build_pipeline(cfg, topology, model)
        self.universal = bool(cfg.train.universal_from) and latest_tag(checkpoint_dir(run_dir)) is None
        with returning_freed_memory():
            self.engine, self.ds_config = build_engine(model, cfg, layout.dp, layout.device, self.universal)
        cache = cfg.data.cache_dir or str(run_dir / "data_cache")
        self.data = TrainData(cfg, tokenizer, layout.dp_rank, layout.dp, cache)
        self.eval_stream = token_stream(cfg.data.eval_path) if cfg.data.eval_path else None
        self.is_logger = layout.rank == 0
        if self.is_logger:
            write_config(run_dir, cfg)
        self.metrics = MetricsLogger(run_dir, self.is_logger)
        precision = resolve_precision(cfg.train.precision, layout.device)
        self.peak = peak_tflops(layout.device, precision, cfg.train.peak_tflops) * 1e12 * layout.world
        self.flops_per_token = training_flops_per_token(cfg)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        self.sgt = sgt.SGT(cfg, layout, layout.device) if cfg.sgt.ratio < 1 else None
        self.teacher = Teacher(cfg, layout.device, compute_dtype(cfg.train.precision, layout.device)) \
            if cfg.distill.teacher else None
        if self.sgt is not None and self.teacher is None:  # distilling, the student's head runs on every position
            self.flops_per_token -= self.sgt.head_flops_saved(cfg.model)
        if self.teacher is not None:  # the teacher's forward is work the step does
            self.flops_per_token += flops_per_token(self.teacher.tcfg.model, cfg.train.seq_length) / 3
        self.gamma_sum, self.gamma_n = 0.0, 0
        self.nan_run, self.saved_step = 0, 0
        self.aux_sums: dict[str, torch.Tensor] = {}
        memory = self.memory()  # every rank: the maximum is a collective
        if self.is_logger:
            counts = parameter_count(cfg)
            active = f" ({counts['active']:,} active per token)" if counts["active"] != counts["total"] else ""
            print(f"model {cfg.name}: {counts['total']:,} parameters{active} | world {layout.world} = "
                  f"tp {layout.tp} x dp {layout.dp} | zero {cfg.parallel.zero_stage} | {precision} on "
                  f"{layout.device.type} | grad accum {self.data.grad_accum} | base memory "
                  f"{memory['base_memory_gib']:.2f} GiB, peak after set-up {memory['peak_memory_gib']:.2f} GiB "
                  f"| run dir {run_dir}", flush=True)
            if trainable:
                print(f"train.trainable '{cfg.train.trainable}': {trainable[0]:,} of this rank's {trainable[1]:,} "
                      "parameters train, the rest are frozen", flush=True)

    def step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step over all micro-batches: (mean loss over DP, grad norm, lr used)."""
        lr = self.engine.get_lr()[0]
        if self.pipeline:  # DeepSpeed's schedule runs the micro-batches; its loss is averaged over them and DP

            batches = [pipe_batch(self.batch(step, m), self.cfg) for m in range(self.data.grad_accum)]
            loss = self.engine.train_batch(iter(batches))
            self._pipeline_aux()
            norm = self.engine.get_global_grad_norm()
            return float(loss), float(norm) if norm is not None else float("nan"), lr
        total = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for micro, host_mask, b in self.micro_batches(step):
            select = self.sgt.selection(b, self.data.sample_index(step, micro), host_mask) \
                if self.sgt is not None else None
            targets = self.teacher(b["tokens"]) if self.teacher is not None else None
            out = self.engine(b["tokens"], b["labels"], select=select, loss_mask=b["loss_mask"], distill=targets)
            loss = losses.next_token_loss(out, b["loss_mask"], self.cfg.sgt.anchor_weight)
            if faults.injected("nan_loss", step + 1):
                loss = loss * float("nan")
            # MTP and router losses: in the objective, logged apart, never in `loss` (the next-token loss).
            for name, (_, term) in out.aux.items():
                self.aux_sums[name] = self.aux_sums.get(name, 0.0) + term.detach() / self.data.grad_accum
            for name, value in out.stats.items():
                self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value.detach() / self.data.grad_accum
            if self.teacher is not None:  # logged under its own name beside kd_loss; `loss` stays the same figure
                self.aux_sums["ce_loss"] = self.aux_sums.get("ce_loss", 0.0) + loss.detach() / self.data.grad_accum
            ce_weight = self.cfg.distill.ce_weight if self.teacher is not None else 1.0
            self.engine.backward(losses.with_aux(ce_weight * loss if ce_weight != 1.0 else loss, out.aux))
            self.engine.step()
            total += loss.detach().double()
        total /= self.data.grad_accum * self.layout.dp
        if self.layout.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        norm = self.engine.get_global_grad_norm()
        return total.item(), float(norm) if norm is not None else float("nan"), lr

    def _pipeline_aux(self) -> None:
        """Each stage summed the auxiliary terms of its own layers: add them up over the stages."""
        names, sums = list(losses.model_aux_weights(self.cfg)), self.engine.module.aux_losses.pop()
        if not names:
            return
        dev = self.layout.device
        vec = torch.stack([torch.as_tensor(sums.get(n, 0.0), dtype=torch.float64, device=dev) for n in names])
        dist.all_reduce(vec, group=self.engine.grid.get_pipe_parallel_group())
        for name, value in zip(names, vec / self.data.grad_accum):
            self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self._to_device(self.data.micro_batch(step, micro))

    def _to_device(self, host: dict) -> dict[str, torch.Tensor]:
        return {k: distributed.to_device(v, self.layout.device) for k, v in host.items()}

    def micro_batches(self, step: int):
        """(micro, host loss mask, batch on the device) of each micro-batch of a step. The next one is read and
        its copy queued before the current one is handed out, while the device still runs the last one's
        kernels (the step has no host syncs to stop that); SGT counts its positions on the host mask."""
        host = self.data.micro_batch(step, 0)
        ahead = self._to_device(host)
        for micro in range(self.data.grad_accum):
            current, current_mask = ahead, host["loss_mask"]
            if micro + 1 < self.data.grad_accum:
                host = self.data.micro_batch(step, micro + 1)
                ahead = self._to_device(host)
            yield micro, current_mask, current

    def probe(self, step: int) -> dict:
        """gamma and the supervised/unsupervised losses on this step's first micro-batch, before the update."""
        module, b = self.engine.module, self.batch(step, 0)
        sup, unsup = self.sgt.probe_masks(module, b, self.data.sample_index(step, 0))
        on = lambda m: lambda: losses.masked_mean(module(b["tokens"], b["labels"]).per_token, m)  # noqa: E731
        params = [p for p in module.parameters() if p.requires_grad]
        gamma = sgt.gradient_cosine(on(sup), on(unsup), params, parallel_state.get_tensor_model_parallel_group(),
                                    self.dp_group)
        return {"gamma": gamma, "batch": b, "masks": (sup, unsup), **self._probe_losses(b, sup, unsup)}

    @torch.no_grad()
    def _probe_losses(self, b: dict, sup: torch.Tensor, unsup: torch.Tensor) -> dict:
        per_token = self.engine.module(b["tokens"], b["labels"]).per_token.float()
        return {"sup_loss": self._dp_mean(losses.masked_mean(per_token, sup)),
                "unsup_loss": self._dp_mean(losses.masked_mean(per_token, unsup))}

    def probe_after(self, probe: dict) -> dict:
        """The same probe batch and positions after the update: did the unsupervised positions' loss fall?"""
        after = self._probe_losses(probe["batch"], *probe["masks"])
        self.gamma_sum += probe["gamma"]
        self.gamma_n += 1
        return {"gamma": probe["gamma"], "gamma_bar": self.gamma_sum / self.gamma_n,
                "probe_sup_loss": probe["sup_loss"], "probe_unsup_loss": probe["unsup_loss"],
                "probe_sup_delta": after["sup_loss"] - probe["sup_loss"],
                "probe_unsup_delta": after["unsup_loss"] - probe["unsup_loss"]}

    def memory(self) -> dict:
        """Peak memory and what it is measured from (`metrics.memory_gib`, `base_memory_gib`), the largest over
        ranks: comparable with `cherry-plan`'s per-rank estimate as peak - base."""
        x = torch.tensor([memory_gib(self.layout.device), self.base_memory], dtype=torch.float64,
                         device=self.layout.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return {"peak_memory_gib": x[0].item(), "base_memory_gib": x[1].item()}

    def shares(self, step: int) -> dict:
        """Per-language consumed tokens and epochs when the data is a blend of several (`data.blend_file`)."""
        if not self.metrics.enabled or (len(self.data.shares.names) < 2 and not self.cfg.data.blend_file):
            return {}
        return self.data.shares.at(step * self.cfg.train.global_batch_size)

    def _dp_mean(self, x: torch.Tensor) -> float:
        x = x.detach().double().clone()
        if self.layout.dp > 1:
            dist.all_reduce(x, group=self.dp_group)
        return x.item() / self.layout.dp

    def evaluate(self) -> float:
        if self.pipeline:
            return self._evaluate_pipeline()
        self.engine.eval()
        loss, _ = window_loss(self.engine, self.eval_stream, self.cfg.train.seq_length,
                              self.cfg.train.eval_tokens, self.cfg.train.micro_batch_size, self.layout.device,
                              self.layout.dp_rank, self.layout.dp, self.dp_group)
        self.engine.train()
        return loss

    def _evaluate_pipeline(self) -> float:
        """`evaluate.window_loss`'s windows through the pipeline: padded to full micro-batches of full
        windows (padding masked out), the same number on every DP rank."""
        t, mbs, dp = self.cfg.train, self.cfg.train.micro_batch_size, self.layout.dp
        every = windows(len(self.eval_stream), t.seq_length, t.eval_tokens)
        n_micro = -(-len(every[0::dp]) // mbs)
        mine = every[self.layout.dp_rank::dp]
        dev, batches = self.layout.device, []
        for i in range(n_micro):
            tokens = torch.zeros(mbs, t.seq_length + 1, dtype=torch.int64)
            mask = torch.zeros(mbs, t.seq_length)
            for j, (start, n) in enumerate(mine[i * mbs:(i + 1) * mbs]):
                tokens[j, :n + 1] = torch.from_numpy(self.eval_stream[start:start + n + 1].astype("int64"))
                mask[j, :n] = 1
            b = {"tokens": tokens[:, :-1].to(dev), "labels": tokens[:, 1:].to(dev), "loss_mask": mask.to(dev)}
            batches.append(pipe_batch(b, self.cfg))
        module = self.engine.module
        module.loss_fn = eval_sums
        compat.reset_pipeline_loss(self.engine)
        try:
            out = self.engine.eval_batch(iter(batches), num_micro_batches=n_micro, bcast_loss=False)
        finally:
            module.loss_fn = train_loss
        sums = out.double() if self.engine.is_last_stage() else torch.zeros(2, dtype=torch.float64, device=dev)
        dist.all_reduce(sums, group=self.engine.grid.get_pipe_parallel_group())  # to every stage
        return (sums[0] / sums[1]).item()

    def save(self, step: int) -> None:
        """A checkpoint becomes `latest` only once every rank has written all its files, and `latest` is
        replaced atomically: a crash mid-save leaves the previous checkpoint the one resumed from."""
        client = {"step": step, "consumed_samples": step * self.cfg.train.global_batch_size,
                  "cherry_config": self.cfg.to_dict(), "gamma_sum": self.gamma_sum, "gamma_n": self.gamma_n}
        ckpt, tag = checkpoint_dir(self.run_dir), f"global_step{step}"
        if faults.injected("crash_in_save", step):
            faults.crash_during_save(self.engine)
        self.engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, save_latest=False)
        if dist.is_initialized():
            dist.barrier()  # DeepSpeed 0.19.8 ends its save with one too; this one does not depend on that
        if self.layout.rank == 0:
            atomic_write_text(ckpt / "latest", tag)
        self.saved_step = step

    def resume(self) -> int:
        ckpt = checkpoint_dir(self.run_dir)
        if self.universal:  # checked by main: `check_universal`
            ckpt = Path(self.cfg.train.universal_from)
        elif latest_tag(ckpt) is None:
            return 0
        path, client = self.engine.load_checkpoint(str(ckpt))
        if path is None or "step" not in (client or {}):
            raise CheckpointError(f"cannot load the latest checkpoint in {ckpt}")
        self.gamma_sum, self.gamma_n = client.get("gamma_sum", 0.0), client.get("gamma_n", 0)
        return int(client["step"])

    def check_loss(self, step: int, loss: float, skipped_before: int) -> bool:
        """True if the step's loss is finite. A non-finite one must have had its update skipped (DeepSpeed's
        optimizers skip non-finite gradients); `train.max_nan_steps` of them in a row stop the run."""
        if math.isfinite(loss):
            self.nan_run = 0
            return True
        if self.engine.skipped_steps == skipped_before:
            raise TrainingError(f"step {step}: loss is {loss} and the update was applied (this optimizer does not "
                                f"skip non-finite gradients, e.g. ZeRO stage 0 in fp32): resume from the last checkpoint")
        self.nan_run += 1
        self.metrics.log(step, skipped_step=1, skipped_steps_total=self.engine.skipped_steps)
        limit = self.cfg.train.max_nan_steps
        if self.nan_run >= limit:
            raise TrainingError(f"{self.nan_run} steps in a row had a non-finite loss (train.max_nan_steps={limit}), "
                                f"last at step {step}; their updates were skipped, the last checkpoint is step "
                                f"{self.saved_step}: lower train.lr or check the data")
        return False

    def iteration(self, step: int, summary: dict, window: dict, preemption: faults.Preemption | None) -> int:
        """One training step and what falls due after it (logs, eval, checkpoint, a preemption stop)."""
        t = self.cfg.train
        probing = self.sgt is not None and self.cfg.sgt.probe_interval and step % self.cfg.sgt.probe_interval == 0
        probe = self.probe(step) if probing else None
        t0, skipped_before, aux_before = time.perf_counter(), self.engine.skipped_steps, dict(self.aux_sums)
        faults.stall(step + 1, preemption)
        loss, grad_norm, lr = self.step(step)
        if probe is not None:
            self.metrics.log(step + 1, **self.probe_after(probe))
        step += 1
        if self.check_loss(step, loss, skipped_before):
            window["loss"] += loss
            window["steps"] += 1
            window["time"] += time.perf_counter() - t0
        else:
            self.aux_sums = aux_before  # a skipped step adds nothing to the logged means
        last = step == t.steps or step == t.exit_at_step
        if (step % t.log_interval == 0 or last) and window["steps"]:
            n, tps = window["steps"], window["steps"] * self.tokens_per_step / window["time"]
            self.metrics.log(step, loss=window["loss"] / n, lr=lr, grad_norm=grad_norm, tokens_per_s=tps,
                             mfu=tps * self.flops_per_token / self.peak, consumed_tokens=step * self.tokens_per_step,
                             step_time_s=window["time"] / n, **self.memory(), **self.shares(step),
                             **{k: self._dp_mean(v) / n for k, v in self.aux_sums.items()})
            self.aux_sums = {}
            summary.update(loss=window["loss"] / n, tokens_per_s=tps)
            window.update(loss=0.0, steps=0, time=0.0)
        if self.eval_stream is not None and (step % t.eval_interval == 0 or step == t.steps):
            summary["eval_loss"] = self.evaluate()
            self.metrics.log(step, eval_loss=summary["eval_loss"])
        # A signal at the last step changes nothing: the run is done and must not be requeued.
        preempted = preemption is not None and preemption.agreed(self.layout.device) and not last
        if step % t.save_interval == 0 or last or (preempted and self.saved_step != step):
            self.save(step)
        if preempted:
            summary["preempted"] = preemption.received or "a signal on another rank"
            self.metrics.log(step, preempted=1)
            if self.layout.rank == 0:
                # The batch script requeues the job when it finds this marker (exit codes do not pass
                # through torchrun); written before any rank exits, so an early exit cannot lose it.
                atomic_write_text(self.run_dir / "preempted", f"{summary['preempted']} at step {step}\n")
            if dist.is_initialized():
                dist.barrier()
        return step

    def fit(self, preemption: faults.Preemption | None = None) -> dict:
        t = self.cfg.train
        start = self.resume()
        self.metrics.resume_at(start)
        self.saved_step = start
        setup = self.memory()  # after building, partitioning and loading, before any step
        self.metrics.log(start, setup_peak_memory_gib=setup["peak_memory_gib"], base_memory_gib=setup["base_memory_gib"],
                         build_memory_gib=self.model_memory)
        summary = {"start_step": start}
        watchdog = faults.StepWatchdog(t.step_timeout_s)
        if start == 0 and self.eval_stream is not None:
            summary["eval_loss_start"] = self.evaluate()
            self.metrics.log(0, eval_loss=summary["eval_loss_start"])
        window = {"loss": 0.0, "steps": 0, "time": 0.0}
        step = start
        while step < t.steps:
            watchdog.arm()  # the whole iteration: step, eval, save and the collectives between them
            try:
                step = self.iteration(step, summary, window, preemption)
            finally:
                watchdog.disarm()
            if "preempted" in summary or step == t.exit_at_step:
                break
        summary["step"] = step
        self.metrics.close()
        return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset name (tiny, small, dense-1b-48l) or YAML path")
    p.add_argument("--run-dir", default="", help="default: runs/<name>")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with cli_errors():
        cfg, tokenizer, run_dir = preflight(args.config, [o for group in args.overrides for o in group],
                                            args.run_dir or None, distributed.world_size_from_env())
        distributed.set_threads(cfg.train.threads)
        layout = distributed.init(cfg.parallel, cfg.train.collective_timeout_s)
        lock = None
        try:
            # Before Trainer(), which writes config.yaml: one writer per run dir, every rank told the outcome.
            lock = run_lock.hold(run_dir, layout.rank)
            with faults.Preemption() as preemption:
                summary = Trainer(cfg, run_dir, layout, tokenizer).fit(preemption)
        finally:
            if lock is not None:  # here, not at exit: the preempted path leaves through sys.exit below
                lock.release()
            distributed.shutdown()
        if layout.rank == 0:
            print("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in summary.items()), flush=True)
        if "preempted" in summary:  # checkpointed and marked (Trainer.iteration): the next start resumes
            sys.exit(faults.REQUEUE_EXIT_CODE)
        return summary


if __name__ == "__main__":
    main()
