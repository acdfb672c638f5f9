"""The default job: built-in shapes benchmark, tiny LLaVA, the whole VisATB pipeline on a CPU.

python -m visatb_jax.launch --config configs/demo.py [--config.train.epochs=2] [--workdir runs/demo]

The paper's regime in miniature: a pretrain stage first trains the base model (projector and
language model) on generated images of its own, as LLaVA's stage-1 alignment and pretrained LM;
the preparation and final runs fine-tune from it. Three balanced tasks of different sizes and
difficulty — caption (768 samples, long answers), count (1,024, one number) and background (768,
one word on a pale palette that no other task names) — and text-only chat at a fixed weight 1.
The benchmark's `tally` task (count's question answered in words on another source's images, a
conflicting convention) is left out: with it, λ found the conflict but VisATB lost to EW
(BENCHMARKS.md B9, 2026-12-08).

Beyond the paper, and the point of this demo (docs/method.md §13–14): every preparation model is
trained twice (`prep.replicates = 2`, its own subset draw and data order each time), so λ's
intervals include the preparation runs' training variance, and λ is only as far from 1 as that
evidence carries (`balance.shrinkage = "evidence"` at the paper's T = 0.5). BENCHMARKS.md B9 has
what this gives over seeds 0–4. The shapes benchmark's vqa and grounding tasks are left out: at
this model size neither improves with its own data in a preparation run (B9, 2026-12-02).
"""

import ml_collections

from visatb_jax.pipeline import presets

# task -> (metric, fixed weight or None): every task of the shapes benchmark. `chat` is the
# text-only task that keeps weight 1.0, as ShareGPT does in the paper's Academic benchmark.
_TASKS = {
    "caption": ("cider", None),
    "vqa": ("exact_match", None),
    "count": ("exact_match", None),
    "grounding": ("iou_accuracy", None),
    "chat": ("exact_match", 1.0),
    "background": ("exact_match", None),
    "tally": ("exact_match", None),  # not trained here: see above
}
# The tasks this job trains on (see above for why vqa and grounding are not among them).
_TASK_ORDER = ("caption", "count", "background", "chat")
# Training samples per task: different sizes, as in a real mixture.
_TRAIN_SIZES = {"caption": 768, "count": 1024, "background": 768, "chat": 768}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "demo"
  c.seed = 0

  c.tasks = ml_collections.ConfigDict({
      name: {"metric": metric, "higher_is_better": True, "fixed_weight": fixed, "group": None}
      for name, (metric, fixed) in _TASKS.items()
  })
  c.task_order = _TASK_ORDER
  # Tasks scored on the test split but never trained on (docs/method.md §12), e.g.
  # {"vqa": {"metric": "exact_match", "higher_is_better": True}}: ΔI_zero against EW.
  c.zero_shot = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.source = "shapes"
  # 384 validation samples per task: one sample is 0.26 points of exact match. "count_scope":
  # every count question asks for all the shapes (counting one colour or kind is not learned at
  # this size). Only the trained tasks are generated.
  c.data.shapes = {"grid": 3, "cell": 16, "max_objects": 4, "count_scope": "all",
                   "sizes": {"train": dict(_TRAIN_SIZES),
                             "val": {t: 384 for t in _TASK_ORDER},
                             "test": {t: 256 for t in _TASK_ORDER}}}
  c.data.vocab_size = 512
  # vicuna_v1 with a shorter system prompt than LLaVA-1.5's, which would double the demo's tokens.
  c.data.system_prompt = "A chat between a human and an assistant."
  c.data.max_len = 128        # one sample, after the chat template
  c.data.seq_len = 256        # one packed row
  c.data.max_images = 6       # images per packed row

  c.model = ml_collections.ConfigDict()
  c.model.vision = {"image_size": 48, "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 3, "num_attention_heads": 4}
  c.model.text = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 512}
  c.model.init_seed = 0

  # Device mesh (visatb_jax/sharding.py); -1 takes the devices the other axes leave.
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}

  c.train = ml_collections.ConfigDict()
  # 6 epochs: with 4, a preparation run of count or background did not learn its task on some
  # seeds, so its own-data gain was noise once training variance was counted (BENCHMARKS.md B9).
  c.train.epochs = 6.0
  # Samples per optimizer step (global), as the paper counts them. Until 2026-12-08 it was 16
  # packed rows, which held 5.9 samples each on this data (~94 a step); 96 samples keep the
  # steps within 12 % of those (a final run: 210 steps of 3,328 samples, 212 before). A step's
  # samples pack into 17-20 rows, padded to the run's most.
  c.train.batch_size = 96
  c.train.accum_steps = 1
  c.train.lr = 2e-3
  c.train.warmup_frac = 0.03
  c.train.clip_norm = 1.0
  c.train.weight_decay = 0.0
  c.train.checkpoint_every = 100
  c.train.log_every = 10
  # Frozen as in LLaVA. Even a random tower's features keep the image apart; trained with the
  # LM from scratch at this learning rate, it learns to ignore the image instead (measured:
  # vqa 0.30 unfrozen after 257 steps vs 0.44 frozen after 129 steps, vqa-only runs).
  c.train.freeze_vision_tower = True

  # The base model every run starts from (pipeline stage `pretrain`): captions and text-only
  # chat on 1,536 generated samples whose images none of the task splits use. 4 epochs: after 2,
  # the base differed so much between seeds that one seed's caption gain was noise (B9).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.enabled = True  # --config.pretrain.enabled=false: start from the random init
  c.pretrain.tasks = {"caption": 1024, "chat": 512}
  c.pretrain.trains = "projector+lm"
  c.pretrain.epochs = 4.0
  c.pretrain.lr = 2e-3
  # The ~84 samples its 16-row steps held: 76 steps (73 before); train.batch_size would give 64.
  c.pretrain.batch_size = 84

  # Preparation stage (docs/method.md section 2). The demo is far below the paper's recommended
  # sizes, which the pipeline reports as a warning.
  c.prep = ml_collections.ConfigDict()
  c.prep.r_large = 1.0
  c.prep.r_mini = 0.125
  # 1: the preparation runs one after another on the whole mesh; K > 1: K at a time, each on
  # 1/K of the devices (one host's devices: a single-process run).
  c.prep.parallel = 1
  # Every preparation model trained twice, each with its own subset draw and data order: λ's
  # intervals then include training variance, which dominated λ's spread over seeds with one
  # (docs/method.md §13; BENCHMARKS.md B9).
  c.prep.replicates = 2

  c.balance = ml_collections.ConfigDict()
  c.balance.form = "real"
  # The paper's T for Academic and Chat. "auto" (the lowest T that keeps every weight in
  # [0.5, 2]) puts a weight on a bound whatever the size of the differences behind it.
  c.balance.temperature = presets.temperature(0.5)
  # Each component's input shrunk toward the tasks' mean by its bootstrap z-score before the
  # paper's formula (docs/method.md §14); "none" gives the paper's λ.
  c.balance.shrinkage = "evidence"
  c.balance.alpha = (0.25, 0.25, 0.5)
  # A task that did not improve with its own data (possible on a benchmark this small) is
  # reported and treated as uninformative rather than stopping the run; "error" stops it.
  c.balance.on_degenerate = "warn"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 40

  # The method of the run's own final model: "visatb" (λ from the prep runs), or any baseline
  # below but "stl" (then the prep, validate and lambda stages are not needed and not run).
  c.weighting = "visatb"
  # Final models trained besides it; STL is the reference of ΔI / ΔE. Also available: "tla",
  # the dynamic weightings "rlw", "dwa", "igb" (options below, sized for the demo's ~190 steps
  # per final run) and the gradient methods "imgrad", "cagrad", "pcgrad", "mgda", "nash".
  c.baselines = ("ew", "stl")
  c.weighting_options = {"dwa": {"window": 10}, "igb": {"base_start": 10, "base_end": 30}}
  return c
