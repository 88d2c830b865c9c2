"""Loading and checking sentencepiece ModelProto files."""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

ModelProto = sp_pb2.ModelProto
Piece = sp_pb2.ModelProto.SentencePiece

NORMAL = Piece.NORMAL
UNKNOWN = Piece.UNKNOWN
CONTROL = Piece.CONTROL
USER_DEFINED = Piece.USER_DEFINED
BYTE = Piece.BYTE
UNUSED = Piece.UNUSED

BPE = sp_pb2.TrainerSpec.BPE
UNIGRAM = sp_pb2.TrainerSpec.UNIGRAM

WHITESPACE = "\u2581"  # '▁', how sentencepiece writes a space inside pieces
SP_FILE_NAME = "tokenizer.model"


class TokenizerFormatError(ValueError):
    """A file that should hold a sentencepiece model does not (or holds the wrong kind)."""


class NotSentencePieceBPEError(TokenizerFormatError):
    """The model is a valid sentencepiece model, but not BPE (e.g. unigram)."""


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A `.model` file, or an HF model directory that contains `tokenizer.model`."""
    path = Path(path)
    if path.is_dir():
        candidate = path / SP_FILE_NAME
        if not candidate.is_file():
            raise TokenizerFormatError(f"{path}: directory has no {SP_FILE_NAME}")
        return candidate
    if not path.is_file():
        raise TokenizerFormatError(f"{path}: no such file or directory")
    return path


def parse_model_proto(data: bytes, source: str) -> ModelProto:
    """Parse and sanity-check serialized bytes; `source` names the file in errors."""
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise TokenizerFormatError(f"{source}: not a sentencepiece model ({err})") from err
    # Arbitrary bytes sometimes parse as a protobuf by accident; a real model has pieces
    # and is accepted by the sentencepiece runtime.
    if len(proto.pieces) == 0:
        raise TokenizerFormatError(f"{source}: not a sentencepiece model (no pieces)")
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as err:
        raise TokenizerFormatError(f"{source}: sentencepiece cannot load it ({err})") from err
    return proto


def load_model_proto(path: str | os.PathLike) -> ModelProto:
    """Load any sentencepiece model (BPE or unigram)."""
    model_path = resolve_model_path(path)
    return parse_model_proto(model_path.read_bytes(), str(model_path))


def load_bpe_model_proto(path: str | os.PathLike) -> ModelProto:
    """Load a sentencepiece model and insist that it is BPE (the only kind we can extend)."""
    model_path = resolve_model_path(path)
    proto = parse_model_proto(model_path.read_bytes(), str(model_path))
    require_bpe(proto, str(model_path))
    return proto


def require_bpe(proto: ModelProto, source: str) -> None:
    model_type = proto.trainer_spec.model_type
    if model_type != BPE:
        name = sp_pb2.TrainerSpec.ModelType.Name(model_type)
        raise NotSentencePieceBPEError(
            f"{source}: sentencepiece model type is {name}, expected BPE "
            "(merging into a unigram model would not keep LLaMA-2's segmentation)"
        )


def processor_from_proto(proto: ModelProto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def as_processor(model) -> spm.SentencePieceProcessor:
    """Accept a processor, a ModelProto, or a path (file or HF dir)."""
    if isinstance(model, spm.SentencePieceProcessor):
        return model
    if isinstance(model, ModelProto):
        return processor_from_proto(model)
    return spm.SentencePieceProcessor(model_file=str(resolve_model_path(model)))


def as_proto(model) -> ModelProto:
    """Accept a ModelProto, a processor, or a path (file or HF dir)."""
    if isinstance(model, ModelProto):
        return model
    if isinstance(model, spm.SentencePieceProcessor):
        proto = ModelProto()
        proto.ParseFromString(model.serialized_model_proto())
        return proto
    return load_model_proto(model)
