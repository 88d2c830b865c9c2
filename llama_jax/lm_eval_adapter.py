"""lm-evaluation-harness model class `llama_jax` (lm-eval 0.4.13, the `.[eval]` extra).

Contract
- `import llama_jax.lm_eval_adapter` registers the model name `llama_jax` in lm-eval's registry, so
  `lm_eval.simple_evaluate(model="llama_jax", model_args="pretrained=DIR[,dtype=bfloat16,
  batch_size=8,max_length=N,adapter=PEFT_DIR,tokenizer=DIR]", tasks=[...])` runs any lm-eval task on
  a llama_jax model (lm-eval's own CLI has no plugin hook for models; `llama-jax eval --lm-eval`
  is that CLI here).
- The class is an lm-eval `TemplateLM`: lm-eval's own code turns (context, continuation) strings
  into token ids (trailing context whitespace moved into the continuation, context + continuation
  encoded whole), so requests are tokenised exactly as its `hf` backend tokenises them; the
  token scoring is `llama_jax.scoring.Scorer` (same truncation rule as `hf`).
  `loglikelihood_rolling` uses lm-eval's rolling windows (prefix token BOS, else EOS);
  `generate_until` decodes greedily (temperature > 0 with do_sample samples) with
  `llama_jax.generate` and cuts at the first stop string.
- `write_local_tasks(dir)`: task YAMLs for C-Eval valid (`ceval-valid_local`, from the official
  zip) and CMMLU test (`cmmlu_local`) from the local CSVs (rewritten as JSON Lines, every cell the
  file's string, read by the HF datasets json builder), with lm-eval's prompts
  (including the shipped task's description, doc_to_text, first_n few-shot sampler), so they run
  offline: `--include-path DIR`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lm_eval.api.model as lm_model
import lm_eval.api.registry as lm_registry
# lm-eval fills its registry with the built-in models (hf, vllm, ...) only while it is empty; register
# those first, or after ours `model="hf"` would be unknown
import lm_eval.models  # noqa: F401
from lm_eval import utils as lm_utils

from .data.multiple_choice import CEVAL_SUBJECTS, CMMLU_SUBJECTS, FORMATS, LETTERS, BenchmarkSource, read_split
from .fsutil import write_text_atomic
from .generate import generate
from .hf import load
from .lora import load_peft, merge
from .scoring import Scorer
from .sharding import make_mesh
from .text import encode, load_tokenizer, prefix_token
from .tokenizer.corpus import default_data_dir

log = logging.getLogger(__name__)


def _as_bool(v):
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@lm_registry.register_model("llama_jax")
class LlamaJaxLM(lm_model.TemplateLM):
    """A llama_jax model (HF Llama dir or llama_jax checkpoint) for lm-eval."""

    def __init__(self, pretrained: str = None, tokenizer: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, adapter: str | None = None,
                 max_gen_toks: int = 256, mesh: str | None = None, model=None, **kwargs):
        super().__init__()
        if kwargs:
            log.info("llama_jax lm-eval model: ignoring %s", sorted(kwargs))  # device, max_batch_size, ...
        if model is None:
            if not pretrained:
                raise ValueError("llama_jax: model_args needs pretrained=DIR")
            shape = {"data": 1, "fsdp": -1, "tensor": 1}
            if mesh:
                shape = {k: int(v) for k, v in (kv.split("=") for kv in str(mesh).split(";"))}
            self._mesh = make_mesh(shape)
            model = load(pretrained, dtype=dtype, mesh=self._mesh)
            if adapter:
                merge(load_peft(model, adapter))
        else:
            self._mesh = getattr(model, "mesh", None)
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(model, batch_size=bs, max_length=int(max_length) if max_length else None, mesh=self._mesh)
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode(self.tokenizer, string, special=True if add_special_tokens is None else add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from tqdm.auto import tqdm

        reqs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        with tqdm(total=len(reqs), desc="llama_jax loglikelihood", disable=disable_tqdm) as bar:
            res = self.scorer.loglikelihood(reqs, progress=lambda n, toks: bar.update(n))
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, w[0], w[1]))
                owner.append(i)
        res = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, res):
            out[i] += ll
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="llama_jax generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            n_new = int(kw.pop("max_gen_toks", self._max_gen_toks))
            temp = float(kw.pop("temperature", 0.0) or 0.0)
            if not _as_bool(kw.pop("do_sample", temp > 0)):
                temp = 0.0
            ids = self.tok_encode(context)[-(self.max_length - n_new):]
            toks = generate(self.model, [ids], max_new_tokens=n_new, temperature=temp,
                                      top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0),
                                      seed=int(kw.pop("seed", 0) or 0), eos_ids=[self.eot_token_id])[0]
            text = self.tok_decode(toks)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


# ----------------------------------------------------------------------------- local task YAMLs
def write_local_tasks(out_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """lm-eval task YAMLs for the local C-Eval (valid) and CMMLU (test) sets; returns out_dir.

    The CSVs are rewritten as JSON Lines beside the YAMLs (read by `multiple_choice.read_questions`,
    the parser `llama-jax eval` uses): through the HF datasets csv builder pandas would turn an
    all-numeric option column into numbers ("0.50" -> 0.5), changing the prompt text."""
    import yaml

    if data_dir is None:
        data_dir = default_data_dir()
    bench = Path(data_dir) / "benchmarks"
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
    sets = [("ceval-valid_local", "ceval", CEVAL_SUBJECTS, bench / "ceval" / "ceval-exam.zip", "validation"),
            ("cmmlu_local", "cmmlu", CMMLU_SUBJECTS, bench / "cmmlu", "test")]
    sets = [x for x in sets if x[3].exists()]
    if not sets:
        raise FileNotFoundError(f"{bench}: neither ceval/ceval-exam.zip nor cmmlu/ found")
    for group, task, subjects, src, split in sets:
        fmt = FORMATS[task]
        qcol, acol = fmt.header[1], fmt.header[6]
        source = BenchmarkSource(src)
        names = []
        for s in subjects:
            if not all(source.exists(fmt.file_names[k].format(s=s)) for k in ("dev", fmt.eval_split)):
                continue
            files = {}
            for key, fsplit in (("dev", "dev"), (split, fmt.eval_split)):
                rows = [{qcol: q.question, **dict(zip(LETTERS, q.choices)), acol: LETTERS[q.answer]}
                        for q in read_split(task, src, s, fsplit)]
                f = out / "data" / group / f"{s}_{fsplit}.jsonl"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                files[key] = str(f)
            name = f"{group}_{s}"
            names.append(name)
            cfg = {
                "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                f"{split}_split": split, "fewshot_split": "dev",
                "fewshot_config": {"sampler": "first_n"}, "output_type": "multiple_choice",
                "description": fmt.description(s),
                "doc_to_text": f"{{{{{qcol}.strip()}}}}\nA. {{{{A}}}}\nB. {{{{B}}}}\nC. {{{{C}}}}\nD. {{{{D}}}}\n"
                               f"{fmt.answer_prompt}",
                "doc_to_choice": ["A", "B", "C", "D"],
                "doc_to_target": f"{{{{['A', 'B', 'C', 'D'].index({acol})}}}}",
                "metric_list": metrics, "metadata": {"version": 1.0},
            }
            (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
        grp = {"group": group, "task": names,
               "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
               "metadata": {"version": 1.0}}
        (out / f"_{group}.yaml").write_text(yaml.safe_dump(grp, sort_keys=False))
    return out


def _local_tasks_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama_jax" / "lm_eval_tasks"
    return write_local_tasks(root, default_data_dir())


def run_tasks(model: str, tasks: list[str], include_path: str | None = None, shots: int | None = None,
              limit: int | None = None, batch_size: int = 8, dtype: str | None = None, adapter: str | None = None,
              max_length: int | None = None, out: str | None = None, lm=None) -> dict:
    """lm_eval.simple_evaluate with the llama_jax model; returns lm-eval's results + a printed table."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    paths = [include_path] if include_path else []
    if any(t.startswith(("ceval-valid_local", "cmmlu_local")) for t in tasks) and not include_path:
        paths.append(str(_local_tasks_dir()))
    tm = TaskManager(include_path=paths or None)
    if lm is None:
        args = {"pretrained": model, "batch_size": batch_size}
        args.update({k: v for k, v in (("dtype", dtype), ("adapter", adapter), ("max_length", max_length)) if v})
        lm = LlamaJaxLM(**args)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=tm,
                                  log_samples=True)
    res["table"] = make_table(res)
    if out:
        keep = {k: v for k, v in res.items() if k in ("results", "groups", "configs", "n-shot", "samples", "table")}
        write_text_atomic(out, json.dumps(keep, ensure_ascii=False, indent=1, default=str) + "\n")
    return res
