"""The checks of a config tree (`config.Config`) that need no data or process group: what `config.load_config`
runs on every config, and the trainer again at its world size. Kept apart from the tree and its loading so
each module reads top to bottom; it reads the tree's attributes only, so it imports nothing of config.py."""
from __future__ import annotations

import re
from typing import Optional

from cherry_megatron.errors import ConfigError

SGT_POLICIES = ("random", "frequency", "loss", "excess", "payload")
SGT_SAMPLING = ("top", "poisson", "conditional")


def validate(cfg, world_size: Optional[int] = None) -> None:
    """Checks that need no data or process group; `world_size` adds the layout checks."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if not m.kv_channels and m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_heads % m.kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.kv_heads}")
    if p.tp < 1 or m.num_heads % p.tp or m.kv_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide the attention heads "
                          f"(num_heads={m.num_heads}, num_kv_heads={m.kv_heads})")
    if m.ffn_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_size}")
    if t.trainable:
        try:
            re.compile(t.trainable)
        except re.error as e:
            raise ConfigError(f"train.trainable '{t.trainable}' is not a regular expression: {e}") from None
        if p.pp > 1:
            raise ConfigError("train.trainable with parallel.pp > 1 is not supported: a stage could hold nothing "
                              "to train")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.pp < 1:
        raise ConfigError(f"parallel.pp must be >= 1, got {p.pp}")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline engine "
                          "supports ZeRO stage 0 or 1 only")
    if p.pipeline_partition not in ("layers", "parameters"):
        raise ConfigError(f"parallel.pipeline_partition must be layers or parameters, got '{p.pipeline_partition}'")
    if p.pp > 1:
        unsupported = {"recurrent.exit_loss_weights": cfg.recurrent.exit_loss_weights, "sgt.ratio < 1": cfg.sgt.ratio < 1,
                       "train.exit_depths": cfg.train.exit_depths}
        for key, on in unsupported.items():
            if on:
                raise ConfigError(f"parallel.pp={p.pp} does not support {key} yet")
        if (cfg.moee.num_experts or cfg.smoe.num_experts or cfg.moee.mtp_depth) and t.precision == "fp16":
            # Auxiliary losses join the gradient outside DeepSpeed's loss scaling (model/pipeline.py).
            raise ConfigError(f"parallel.pp={p.pp} with router or MTP losses needs train.precision fp32 or bf16, "
                              "not fp16")
        if m.num_layers < p.pp:
            raise ConfigError(f"parallel.pp={p.pp} is more stages than model.num_layers={m.num_layers}")
    if t.max_nan_steps < 1 or t.step_timeout_s < 0:
        raise ConfigError("train.max_nan_steps must be >= 1 and train.step_timeout_s >= 0 (0: no watchdog)")
    if t.collective_timeout_s <= 0 or (t.step_timeout_s and t.collective_timeout_s >= t.step_timeout_s):
        raise ConfigError(f"train.collective_timeout_s={t.collective_timeout_s:g} must be > 0 and below "
                          f"train.step_timeout_s={t.step_timeout_s:g} (the watchdog), so a hung collective fails first")
    if t.activation_checkpointing < 0:
        raise ConfigError(f"train.activation_checkpointing must be 0 (off) or n >= 1 (every n-th layer), "
                          f"got {t.activation_checkpointing}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got '{t.precision}'")
    for key in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                "eval_interval", "save_interval"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be positive, got {getattr(t, key)}")
    validate_recurrent(cfg)
    validate_moee(cfg, world_size)
    g = cfg.sgt
    if not 0 < g.ratio <= 1:
        raise ConfigError(f"sgt.ratio must be in (0, 1], got {g.ratio}")
    if g.policy not in SGT_POLICIES:
        raise ConfigError(f"sgt.policy must be one of {', '.join(SGT_POLICIES)}, got '{g.policy}'")
    if g.sampling not in SGT_SAMPLING:
        raise ConfigError(f"sgt.sampling must be one of {', '.join(SGT_SAMPLING)}, got '{g.sampling}'")
    if not g.temperature > 0:
        raise ConfigError(f"sgt.temperature must be positive, got {g.temperature}")
    if g.max_weight and not g.max_weight >= 1:
        raise ConfigError(f"sgt.max_weight must be 0 (off) or at least 1 (a weight 1/pi is never below 1), "
                          f"got {g.max_weight}")
    if g.scope not in ("sequence", "batch"):
        raise ConfigError(f"sgt.scope must be sequence or batch, got '{g.scope}'")
    if g.sampling == "top" and (g.temperature != 1.0 or g.max_weight):
        raise ConfigError("sgt.temperature and sgt.max_weight shape a drawn selection: they need "
                          "sgt.sampling=poisson or conditional (top takes the best-scored positions, unweighted)")
    if g.seed < 0:
        raise ConfigError(f"sgt.seed must be >= 0, got {g.seed}")
    if g.sampling == "conditional" and g.scope == "batch" and g.ratio < 1:
        # Its sampler keeps a table of (positions x count) per group and walks the positions in order: per
        # sequence that is 256 x 38 at 15%; a whole micro-batch of 8 x 4096 would be 32768 x 4915.
        raise ConfigError("sgt.sampling=conditional draws per sequence: use sgt.scope=sequence (or "
                          "sgt.sampling=poisson, which any scope takes)")
    if not 0 <= g.anchor_weight < 1:
        raise ConfigError(f"sgt.anchor_weight must be in [0, 1), got {g.anchor_weight}")
    if g.policy == "excess" and g.ratio < 1 and not g.reference:
        raise ConfigError("sgt.policy=excess needs sgt.reference (a checkpoint of the frozen reference model)")
    if g.probe_interval and g.ratio == 1:
        raise ConfigError("sgt.probe_interval needs sgt.ratio < 1 (there are no unsupervised positions to probe)")
    if g.probe_interval and p.zero_stage == 3:
        raise ConfigError("sgt.probe_interval needs whole parameters on each rank: use parallel.zero_stage <= 2")
    validate_distill(cfg)
    validate_exits(cfg)
    if world_size is not None:
        if world_size % (p.tp * p.pp):
            raise ConfigError(f"parallel.tp={p.tp} x parallel.pp={p.pp} does not divide the world size {world_size}")
        dp = world_size // (p.tp * p.pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                              f"micro_batch_size={t.micro_batch_size} x data-parallel size {dp}")


def validate_exits(cfg) -> None:
    t, n = cfg.train, cfg.model.num_layers
    if any(not 1 <= d < n for d in t.exit_depths):
        raise ConfigError(f"train.exit_depths must lie in 1..{n - 1} (depth {n} is the final readout)")
    if len(set(t.exit_depths)) != len(t.exit_depths):
        raise ConfigError(f"train.exit_depths repeats a depth: {t.exit_depths}")
    if len(t.exit_loss_weights) != len(t.exit_depths):
        raise ConfigError("train.exit_loss_weights needs one weight per train.exit_depths entry")
    if min(t.exit_loss_weights, default=0) < 0 or t.exit_distill_weight < 0:
        raise ConfigError("train.exit_loss_weights and train.exit_distill_weight must be >= 0")
    if t.exit_distill_weight and not (t.exit_depths or cfg.recurrent.exit_loss_weights):
        raise ConfigError("train.exit_distill_weight needs exits to distil into: train.exit_depths (or a recurrent "
                          "model's recurrent.exit_loss_weights)")


def validate_distill(cfg) -> None:
    d = cfg.distill
    if not d.temperature > 0:
        raise ConfigError(f"distill.temperature must be positive, got {d.temperature}")
    if min(d.kd_weight, d.ce_weight, d.hidden_weight) < 0:
        raise ConfigError("distill.kd_weight, distill.ce_weight and distill.hidden_weight must be >= 0")
    if not d.teacher:
        if d.hidden_weight or d.ce_weight != 1.0:
            raise ConfigError("distill.* weights are set but distill.teacher is empty (no distillation)")
        return
    if cfg.parallel.pp > 1:
        raise ConfigError(f"distill.teacher with parallel.pp={cfg.parallel.pp} is not built (the teacher's logits "
                          "would have to travel with the pipeline's activations): distil at parallel.pp=1")
    if d.kd_weight == 0 and d.hidden_weight == 0:
        raise ConfigError("distill.teacher is set but distill.kd_weight and distill.hidden_weight are both 0")


def validate_recurrent(cfg) -> None:
    r, n = cfg.recurrent, cfg.model.num_layers
    if not r.num_blocks:
        if r.schedule or r.lora_rank or r.exit_depths:
            raise ConfigError("recurrent.* is set but recurrent.num_blocks is 0 (a dense model)")
        return
    if r.schedule and len(r.schedule) != n:
        raise ConfigError(f"recurrent.schedule has {len(r.schedule)} positions but model.num_layers={n} "
                          "(the unrolled depth); set both")
    if not r.schedule and n % r.num_blocks:
        raise ConfigError(f"recurrent.num_blocks={r.num_blocks} does not divide model.num_layers={n}; "
                          "give recurrent.schedule explicitly")
    sched = r.resolved_schedule(n)
    if any(not 0 <= b < r.num_blocks for b in sched) or set(sched) != set(range(r.num_blocks)):
        raise ConfigError(f"recurrent.schedule must use every block 0..{r.num_blocks - 1} and nothing else")
    if any(not 1 <= d <= n for d in r.exit_depths):
        raise ConfigError(f"recurrent.exit_depths must lie in 1..{n}")
    if r.exit_loss_weights and len(r.exit_loss_weights) != len(r.exit_depths):
        raise ConfigError("recurrent.exit_loss_weights needs one weight per recurrent.exit_depths entry")
    if r.lora_rank < 0:
        raise ConfigError("recurrent.lora_rank must be >= 0")


def validate_moee(cfg, world_size: Optional[int] = None) -> None:
    e = cfg.moee
    if e.mtp_depth < 0 or e.mtp_weight < 0:
        raise ConfigError("moee.mtp_depth and moee.mtp_weight must be >= 0")
    if not e.num_experts:
        if e.ep_size != 1 or e.top_k != 1:
            raise ConfigError("moee.ep_size/top_k are set but moee.num_experts is 0 (no MoE layers)")
    else:
        validate_routing(cfg, "moee", world_size)
    s = cfg.smoe
    if not s.num_experts:
        if s.ep_size != 1:
            raise ConfigError("smoe.ep_size is set but smoe.num_experts is 0 (not a sparse model)")
        return
    if e.num_experts or e.mtp_depth or cfg.recurrent.num_blocks:
        raise ConfigError("smoe.num_experts > 0 is a model of its own: it takes no moee.num_experts, moee.mtp_depth "
                          "or recurrent.num_blocks")
    validate_routing(cfg, "smoe", world_size)
    if s.attention_experts and cfg.model.num_heads != cfg.model.kv_heads:
        raise ConfigError(f"smoe.attention_experts: each expert's queries have the shared model.num_kv_heads="
                          f"{cfg.model.kv_heads} heads; set model.num_heads to it too (got {cfg.model.num_heads})")


def validate_routing(cfg, section: str, world_size: Optional[int] = None) -> None:
    """The routed MLPs' settings, in `moee` or `smoe` (the same names)."""
    e = getattr(cfg, section)
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"{section}.top_k={e.top_k} must lie in 1..{section}.num_experts={e.num_experts}")
    if e.ep_size < 1 or e.num_experts % e.ep_size:
        raise ConfigError(f"{section}.ep_size={e.ep_size} does not divide {section}.num_experts={e.num_experts}")
    if cfg.parallel.zero_stage == 3:
        raise ConfigError(f"{section}.num_experts > 0 needs parallel.zero_stage <= 2 "
                          "(DeepSpeed's MoE layers are not supported under ZeRO stage 3)")
    if e.capacity_factor < 0 or e.load_balance_weight < 0 or e.z_loss_weight < 0 or e.router_jitter < 0:
        raise ConfigError(f"{section}.capacity_factor, load_balance_weight, z_loss_weight and router_jitter "
                          "must be >= 0")
    if cfg.sgt.probe_interval:
        raise ConfigError("sgt.probe_interval is not supported with MoE layers (expert gradients live on "
                          "expert-parallel groups)")
    if world_size is not None:
        # DeepSpeed's expert groups span all ranks (TP ranks split the routed tokens between them).
        if world_size % e.ep_size:
            raise ConfigError(f"{section}.ep_size={e.ep_size} does not divide the world size {world_size}")
        p = cfg.parallel
        if p.pp > 1 and world_size % (p.tp * p.pp) == 0 and (world_size // (p.tp * p.pp)) % e.ep_size:
            # Each stage's experts are spread over that stage's data-parallel ranks.
            raise ConfigError(f"{section}.ep_size={e.ep_size} does not divide the data-parallel size "
                              f"{world_size // (p.tp * p.pp)} of each pipeline stage")
