"""Every default of a run, documented where it is declared; family files only pick an objective.

A run is ``python -m prefixlm.main --config=configs/<family>.py[:ARGS] --workdir=DIR`` where ARGS
is a comma-separated list of presets and values (see :func:`apply_args`), e.g. ``demo``,
``eps=1.0``, ``seed=1``, ``demo,eps=1.0,train.steps=50``; ``--config.a.b=v`` flags override
anything afterwards. Derived values (run name, batch size, step count, warmup) are left as
placeholders here and filled in by ``prefixlm.config_lib.resolve`` from the final values, so
an override of ``data.seq_len`` or ``train.batch_tokens`` moves everything that depends on it.

The seven runs of the study (seed 0) are exactly these config strings::

    configs/ce.py                      -> ce_seed0
    configs/label_smoothing.py         -> label_smoothing_eps0p1_seed0
    configs/prefix_simple.py           -> prefix_simple_eps0p1_seed0
    configs/prefix_unnorm.py           -> prefix_unnorm_eps0p1_seed0
    configs/prefix_unnorm.py:eps=1.0   -> prefix_unnorm_eps1p0_seed0
    configs/prefix_norm.py             -> prefix_norm_eps0p1_seed0
    configs/prefix_norm.py:eps=1.0     -> prefix_norm_eps1p0_seed0
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from prefixlm.objectives import families, registry

OBJECTIVES = families.NAMES  # the registry in prefixlm/objectives/families.py is the one list
HARDWARE_PRESETS = ("h100", "a100", "tpu_v4", "tpu_v5e")  # configs/hardware.py
PRESETS = ("demo", "tiny", *HARDWARE_PRESETS)
# Short names accepted in ARGS, and the field each sets.
SHORT_KEYS = {
    "eps": "objective.eps",
    "seed": "seed",
    "temperature": "objective.temperature",
    "tau": "objective.temperature",
    "prefix_set": "objective.prefix_set",
    "steps": "train.steps",
    "data_seed": "data_seed",
    "attention": "model.attention",
}
DEMO_SHARDS = "data/demo/shards"  # made by `make demo` / prefixlm.data.corpus.prepare_demo


def get_config() -> ml_collections.ConfigDict:
    """The ~100M-parameter study configuration (FineWeb-Edu, 2B tokens, seq 2048)."""
    c = ml_collections.ConfigDict()
    c.name = ""  # run name; "" -> derived, e.g. prefix_norm_eps0p1_seed0 (see config_lib.run_name)
    c.preset = ""  # which preset get_config applied ("demo", ...); part of the run name
    c.seed = 0  # parameter init and the step RNG derive from it (and data order, see data_seed)
    # Data order alone; -1 = seed. Seeds over init with a fixed data order (or the reverse)
    # separate the two sources of run-to-run noise.
    c.data_seed = -1
    c.log_every = 50  # steps between metrics.jsonl / TensorBoard lines (and NaN checks)
    # Per-device peak FLOP/s for MFU; 0 -> looked up from the device kind (prefixlm.core.hardware),
    # e.g. 989e12 for an H100's dense bf16. MFU is null when it is unknown (CPU).
    c.peak_flops = 0.0
    # Microbatches per step: the global batch is split into grad_accum equal parts whose
    # gradients are summed in one jitted step (a lax.scan), so memory is that of one part.
    c.grad_accum = 1
    c.progress = True  # tqdm progress bar with ETA on process 0
    # Extra XLA flags for this run, added to $XLA_FLAGS before JAX starts (hardware presets set
    # them; e.g. "--xla_gpu_enable_latency_hiding_scheduler=true").
    c.xla_flags = ""

    # ~100M parameters total with the tied 128,256 x 512 embedding (65.7M of it):
    # 10 layers x 3.15M (GQA 8 query / 4 kv heads of 64, SwiGLU 1536) + norms = 97,135,104.
    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 128256  # Llama 3 (128,000 BPE + 256 specials); must match the tokenizer
    m.d_model = 512
    m.n_layers = 10
    m.n_heads = 8  # head_dim = d_model / n_heads = 64
    m.n_kv_heads = 4  # grouped-query attention, 2 query heads per kv head (Llama 3 uses 4:1)
    m.d_ff = 1536  # SwiGLU width, 3 x d_model (~8/3 x d_model rounded up to a multiple of 256)
    m.max_seq_len = 2048  # data.seq_len may not exceed it
    m.rope_theta = 500000.0
    m.norm_eps = 1e-5
    m.tie_embeddings = True
    m.dtype = "bfloat16"  # compute dtype; parameters, logits and the loss are float32
    m.remat = False  # per-layer rematerialisation: less activation memory, ~1/3 more compute
    # Which activations a layer keeps for the backward pass: "none" (all), "full" (= remat True:
    # only the layer input), or a finer jax.checkpoint policy (model.REMAT_POLICIES).
    m.remat_policy = "none"
    # Attention kernel: auto (cudnn on GPU, splash on TPU, blockwise elsewhere), xla (plain, saves
    # the [heads, T, T] scores), blockwise (pure-JAX flash-style, O(T) memory), cudnn, splash.
    # The kernel chosen is checked against blockwise at start-up and recorded in DIR/kernels.json.
    m.attention = "auto"
    # If that check rejects cudnn or splash: "none" stops the run (exit 2, naming the kernel and
    # the error); "blockwise" trains on with the portable kernel (several times slower on GPU),
    # with a warning and kernels.json saying so.
    m.attention_fallback = "none"

    c.objective = o = ml_collections.ConfigDict()
    o.name = "ce"  # one of OBJECTIVES; each family file sets its own
    o.eps = 0.0  # smoothing mass in [0, 1]; 0.1 for the smoothing families (family files)
    o.temperature = 1.0  # tau dividing the prefix lengths inside the softmax
    o.prefix_set = "proper"  # "proper" = the seed's P(s); "with_gold" = R(s) = P(s) + gold
    # Tokens per chunk of the fused loss; its [chunk, V] buffer is in the compute dtype
    # (bfloat16 on accelerators: ~chunk x V x 2 B; prefixlm/objectives/fused_loss.py).
    o.chunk_size = 2048
    # eps over training (prefixlm/objectives/eps_schedule.py), computed in the step from one set of tables
    # (the target is linear in eps): "constant"; "linear" decay to 0 over eps_decay_fraction of
    # train.steps; "hold_linear": eps held for eps_hold_fraction of the steps, then the linear
    # decay over eps_decay_fraction, then 0 (modded-nanogpt's record: hold 1/3, decay 1/3).
    o.eps_schedule = "constant"
    o.eps_decay_fraction = 1.0  # in (0, 1]; ignored by "constant"
    o.eps_hold_fraction = 0.0  # in [0, 1), hold + decay <= 1; "hold_linear" only
    # prefix_longest only: "smoothing" = (1 - eps) CE(y) + eps CE(p), p the longest proper
    # prefix of y; "aux" = CE(y) + eps CE(p) (gold weight 1, prefix weight eps: not normalised),
    # modded-nanogpt's 2026-07 record. Both are plain CE where y has no proper prefix.
    o.prefix_longest_form = "smoothing"

    c.data = d = ml_collections.ConfigDict()
    d.path = "data/fineweb-edu/shards"  # made by prefixlm.data.fineweb + prefixlm.data.tokenize
    d.val_path = ""  # "" -> the "validation" split of data.path
    d.tokenizer = "llama3"  # prefixlm.vocab.tokenizer.load name; its hash must match the shards'
    d.seq_len = 2048
    d.worker_count = 0  # grain worker processes; 0 reads memmaps in-process (fast enough)
    d.prefetch_threads = 2
    # False: a train split shorter than train.steps x train.batch_tokens is refused before
    # training (exit 2, naming the shortfall). True: the run repeats the data in reshuffled
    # epochs and logs each epoch boundary (prefixlm.data.pipeline.check_enough).
    d.allow_repeat = False

    c.train = t = ml_collections.ConfigDict()
    t.tokens = 2_000_000_000  # training budget; steps = tokens // (batch_size x seq_len)
    t.batch_tokens = 524_288  # 0.5M tokens per step -> batch_size = 256 sequences of 2048
    t.batch_size = config_dict.placeholder(int)  # global sequences per step; None -> derived
    t.steps = config_dict.placeholder(int)  # None -> tokens // (batch_size x seq_len) = 3814

    c.optim = p = ml_collections.ConfigDict()
    p.lr = 3e-3  # peak AdamW learning rate (small models tolerate high rates)
    p.warmup_steps = config_dict.placeholder(int)  # None -> 5% of train.steps, at most 1000
    p.min_lr_ratio = 0.1  # cosine decays to lr x min_lr_ratio at the last step
    p.b1 = 0.9
    p.b2 = 0.95
    p.eps = 1e-8
    p.weight_decay = 0.1  # decoupled; not applied to norm weights (1-D parameters)
    p.clip_norm = 1.0  # global gradient-norm clipping; 0 disables

    c.eval = e = ml_collections.ConfigDict()
    e.every = 1000  # steps between evaluations (and at the end); 0 disables
    e.tasks = "piqa,winogrande,arc_easy,hellaswag,charbench"  # prefixlm.evaluate task names
    e.limit = config_dict.placeholder(int)  # documents per task in-loop; None = all
    # Per-task in-loop limits (a group's applies to each subtask): fixed label-stratified subsets,
    # the same documents at every step and in every run, sized so an in-loop evaluation costs
    # <= 10% of the training between evaluations (arithmetic in the README). "" = eval.limit.
    e.limits = "piqa=1000,winogrande=1000,arc_easy=1000,hellaswag=1000,charbench=250"
    e.final_full = True  # the last evaluation of a run scores the full sets
    e.num_fewshot = 5
    e.batch_size = 32  # sequences per evaluation forward pass
    # Validation loss/NLL on the first val_tokens target tokens of the validation split, in
    # order: the same windows for every seed, data_seed, preset and device count (2**21 = 1,024
    # windows of 2,048; fewer, with a warning, if the split is smaller); 0 = off.
    e.val_tokens = 2**21
    # A failed evaluation is logged (eval/error) and training goes on (the checkpoint of that
    # step is saved before evaluating); True stops the run instead.
    e.stop_on_error = False

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every = 500  # steps between checkpoints (one is also written at the end and on SIGTERM)
    k.max_to_keep = 3
    k.async_save = True  # orbax writes in a background thread while training continues
    # With several processes, steps between their SIGTERM agreements (an all-gather that waits
    # for the device, so not every step); a SIGTERM costs at most this many more steps before
    # the save: 5-15 s at an estimated (not measured) 1-3 s per study step, well inside the
    # usual 30 s grace. One process checks after every step.
    k.preemption_check_every = 5

    c.log = g = ml_collections.ConfigDict()
    g.tensorboard = True  # DIR/tensorboard events
    g.wandb = ""  # Weights & Biases project; "" = off (pip install wandb)
    g.wandb_entity = ""  # W&B team or user; "" = your default
    g.wandb_mode = ""  # "online", "offline" (sync later), or "" = $WANDB_MODE / W&B's default
    # Optional sinks (TensorBoard, W&B) are checked before the run writes anything: one that
    # cannot work is dropped with a warning and training goes on. True stops the run instead
    # (one line, exit 2, still before anything is written).
    g.require = False

    c.profile = f = ml_collections.ConfigDict()
    # "START,END": a jax.profiler trace of steps START..END (inclusive) under DIR/profile, for
    # TensorBoard's profile plugin or Perfetto; "" = off. Leave a few steps after compilation.
    f.steps = ""

    c.mesh = h = ml_collections.ConfigDict()
    h.data = -1  # data-parallel axis size; -1 = all devices not used by fsdp
    h.fsdp = 1  # parameter/optimizer sharding axis size (ZeRO-3 style); batch is split over both
    return c


def demo(c: ml_collections.ConfigDict) -> None:
    """Tiny model on the embedded offline corpus: a few minutes on 2 CPU cores, loss falling."""
    c.preset = "demo"
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128)
    c.data.path = DEMO_SHARDS
    c.data.seq_len = 128
    c.data.prefetch_threads = 1
    c.train.batch_size = 4
    c.train.steps = 200  # ~1.3 s/step on 2 busy CPU cores: about 4-5 minutes
    c.optim.lr = 1e-2
    c.objective.chunk_size = 512
    c.log_every = 10
    # Validation loss and the five tasks on 20 fixed documents each (CharBench: 20 per subtask)
    # at steps 0, 100 and 200: enough for the study report's machinery, not to separate runs (a
    # 2-layer model scores at chance, and the report says so).
    c.eval.every = 100
    c.eval.limit = 20
    c.eval.limits = ""
    c.eval.final_full = False
    c.eval.batch_size = 16
    c.eval.val_tokens = 4096  # 32 windows of 128
    c.checkpoint.every = 100


def tiny(c: ml_collections.ConfigDict) -> None:
    """The demo model at 16 tokens per sequence: for tests and smoke runs (seconds)."""
    demo(c)
    c.preset = "tiny"
    c.eval.tasks = ""  # tests plug in their own evaluation
    # float32 so tests can compare 1 vs 2 devices and accumulation at float32 tolerance.
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32,
                   dtype="float32")
    c.data.seq_len = 16
    c.train.batch_size = 2
    c.train.steps = 20
    c.objective.chunk_size = 16
    c.log_every = 5
    c.checkpoint.every = 10
    c.eval.val_tokens = 512  # 32 windows of 16


def _parse_value(field: str, old, text: str):
    """Converts ARGS text to the type of the field it overrides (bool, int, float or str)."""
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError:
        raise ValueError(f"config arg {field}={text!r}: expected a {type(old).__name__}") from None
    return text


def apply_args(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies "demo,eps=1.0,seed=1,train.steps=10": presets first (in order), then values."""
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    presets = [s for s in items if "=" not in s]
    for name in presets:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in config args {arg!r}; presets are "
                             f"{', '.join(PRESETS)}, values look like eps=1.0 or seed=1")
        if name in HARDWARE_PRESETS:
            # Hardware presets change how a run is computed, not what is trained, so they stay
            # out of the run name (c.preset) and out of the run's identity.
            from configs import hardware

            preset = c.preset
            getattr(hardware, name)(c)
            c.preset = preset
        else:
            globals()[name](c)
    for item in items:
        if "=" not in item:
            continue
        key, text = (s.strip() for s in item.split("=", 1))
        path = SHORT_KEYS.get(key, key)
        if key == "eps" and c.objective.name == "ce":
            raise ValueError("eps has no meaning for the ce objective; drop it, or use "
                             "configs/label_smoothing.py")
        *parents, leaf = path.split(".")
        node = c
        try:
            for p in parents:
                node = node[p]
            old = node[leaf]
        except (KeyError, AttributeError):
            raise ValueError(f"unknown config key {key!r} in config args {arg!r}; use one of "
                             f"{', '.join(SHORT_KEYS)} or a dotted field such as train.steps"
                             ) from None
        if old is None:  # a placeholder: its declared type
            old = {"train.steps": 0, "train.batch_size": 0, "optim.warmup_steps": 0,
                   "eval.limit": 0}.get(path, "")
        node[leaf] = _parse_value(path, old, text)
    return c


def family_config(name: str, arg: str | None, eps: float | None = None
                  ) -> ml_collections.ConfigDict:
    """The base config with objective ``name`` at its registered default eps."""
    c = get_config()
    c.objective.name = name
    family = registry.FAMILIES.get(name)
    default = family.default_eps if family is not None else (0.0 if name == "ce" else 0.1)
    c.objective.eps = float(default if eps is None else eps)
    c.data_seed = -1
    return apply_args(c, arg)
