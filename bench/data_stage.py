"""Measure the data stage: `dgpt prepare`-equivalent time on a preset, token counts, and the
pretraining tokenization throughput (MB/s of UTF-8 text) with 1 and 2 processes.

    python -m bench.data_stage [--preset tiny] [--num-proc 1 2] [--out DIR] [--json FILE]

The throughput corpus is every chitchat conversation rendered as pretraining text plus the
preset's skills text (~13 MB), tokenized with the preset's tokenizer through the same
`datasets.map` path the pretraining stage uses. Run it offline; it uses the CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="work folder (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--skip-prepare", action="store_true", help="only the throughput (builds the tokenizer only)")
    args = parser.parse_args()

    from dgpt_core.config import DataConfig, SourceSpec, load_run_config
    from dgpt_core.data.manifest import read_manifest
    from dgpt_core.data.pretrain import tokenize_documents
    from dgpt_core.data.sources import LoadStats, iter_text_routed, resolve
    from dgpt_core.data.stages import prepare_all
    from dgpt_core.models.tokenizer import load_tokenizer

    cfg = load_run_config(args.preset, args.overrides)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-data-"))
    results: dict = {"preset": args.preset, "cpus": os.cpu_count(), "prepare": {}, "throughput": {},
                     "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)")}
    try:
        if args.skip_prepare:
            from dgpt_core.data.stages import prepare_tokenizer_stage

            prepare_tokenizer_stage(cfg.tokenizer, cfg.data, work / f"prepare-np{args.num_proc[0]}" / "tokenizer")
        for n in [] if args.skip_prepare else args.num_proc:
            data = cfg.data.model_copy(update={"num_proc": n})
            folder = work / f"prepare-np{n}"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            folders = prepare_all(data, cfg.tokenizer, cfg.model.max_seq_len, folder, force=True)
            seconds = time.perf_counter() - t0
            row = {"seconds": round(seconds, 2)}
            for stage, path in folders.items():
                m = read_manifest(path)
                row[f"{stage}_seconds"] = m.get("seconds")
                if stage == "pretrain":
                    row["pretrain_sequences"] = m["splits"]
                    row["pretrain_tokens"] = {sp: t["tokens_out"] for sp, t in m["tokens"].items()}
                    row["pretrain_stage_MB_per_s"] = m["throughput"]["MB_per_s"]
                if stage == "sft":
                    row["sft_examples"] = m["splits"]
                    row["sft_tokens"] = {sp: t["tokens"] for sp, t in m["tokens"].items()}
                    row["sft_eligible_tokens"] = {sp: t["eligible_tokens"] for sp, t in m["tokens"].items()}
            results["prepare"][f"num_proc={n}"] = row
            print(f"prepare num_proc={n}: {json.dumps(row)}", flush=True)

        tok = load_tokenizer(work / f"prepare-np{args.num_proc[0]}" / "tokenizer")
        corpus_cfg = DataConfig(validation_fraction=0.0, skills=cfg.data.skills)
        docs: list[str] = []
        for name in ("chitchat", "skills"):
            docs += [t for _, t in iter_text_routed(resolve(SourceSpec(name=name)), corpus_cfg, LoadStats())]
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        results["throughput"]["corpus_MB"] = round(mb, 2)
        results["throughput"]["documents"] = len(docs)
        for n in args.num_proc:
            best = None
            for _ in range(2):
                t0 = time.perf_counter()
                ds = tokenize_documents(docs, tok, num_proc=n, batch_size=1000)
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            tokens = sum(len(x) for x in ds["input_ids"])
            results["throughput"][f"num_proc={n}"] = {"seconds": round(best, 2), "MB_per_s": round(mb / best, 2),
                                                      "tokens": tokens, "tokens_per_s": round(tokens / best)}
            print(f"tokenize {mb:.1f} MB num_proc={n}: {best:.2f}s = {mb / best:.2f} MB/s, {tokens} tokens", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
