"""Chinese vocabulary extension for LLaMA-2: train, merge, report, HF export, embedding resize.

Typical flow::

    train_bpe("zh", input_files=["zh.txt"], vocab_size=20000)          # zh.model / zh.vocab
    merge_tokenizers("llama2/tokenizer.model", "zh.model", "merged/")  # tokenizer.model + HF files
    tokenizer_report("merged/", "llama2/tokenizer.model", ["held_out.txt"])
    new_embed = init_new_rows(old_embed, base_sp, merged_sp, new_vocab_size)
"""

from .corpus import CorpusStats, EmptyCorpusError, default_data_dir
from .dead_pieces import find_dead_pieces, find_unreachable_pieces, plan_repair
from .hf_files import build_hf_tokenizer, write_hf_files
from .merge import MergeOptions, MergeResult, merge_model_protos, merge_tokenizers
from .report import TokenizerReport, format_report, tokenizer_report
from .new_rows import init_new_rows
from .sp_model import NotSentencePieceBPEError, TokenizerFormatError, load_model_proto
from .train import TrainOptions, TrainResult, train_bpe

__all__ = [
    "CorpusStats",
    "EmptyCorpusError",
    "MergeOptions",
    "MergeResult",
    "NotSentencePieceBPEError",
    "TokenizerFormatError",
    "TokenizerReport",
    "TrainOptions",
    "TrainResult",
    "build_hf_tokenizer",
    "default_data_dir",
    "find_dead_pieces",
    "format_report",
    "init_new_rows",
    "load_model_proto",
    "merge_model_protos",
    "merge_tokenizers",
    "plan_repair",
    "find_unreachable_pieces",
    "tokenizer_report",
    "train_bpe",
    "write_hf_files",
]
