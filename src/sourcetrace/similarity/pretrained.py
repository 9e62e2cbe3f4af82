"""Pretrained audio embedders loaded from a local folder only: CLAP (`transformers.ClapModel`) and MERT.

Nothing is downloaded: the folder must hold the model's config, weights and feature-extractor config, as
`save_pretrained` writes them (or as a Hugging Face snapshot holds them). A missing file is named in the
error. The clips must be at the feature extractor's sample rate (48 kHz for LAION's CLAP, 24 kHz for MERT).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtraError, require
from .embedders import AudioEmbedder, unit_rows

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
           "pytorch_model.bin.index.json")


class PretrainedFilesError(MissingExtraError):
    """A local model folder without the files a pretrained embedder needs."""


def check_folder(folder: str | Path, what: str) -> Path:
    """The folder, once it is known to hold a config, weights and a feature-extractor config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedFilesError(f"{what} needs a local model folder; {str(folder)!r} is not a folder "
                                   "(download the model elsewhere and copy its folder here: nothing is "
                                   "fetched)")
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).exists()]
    if not any((folder / w).exists() for w in WEIGHTS):
        missing.append(" or ".join(WEIGHTS[:2]))
    if missing:
        raise PretrainedFilesError(f"{what} model folder {str(folder)!r} lacks {', '.join(missing)}; give "
                                   "the folder that `save_pretrained` wrote (config, weights, preprocessor "
                                   "config)")
    return folder


class _HFAudioEmbedder(AudioEmbedder):
    """Shared loading and batching; subclasses say how to turn model outputs into one vector per clip."""

    what = "pretrained"

    def __init__(self, folder: str, batch: int = 8) -> None:
        require("transformers", "llm")
        self.folder = check_folder(folder, self.what)
        rate = json.loads((self.folder / "preprocessor_config.json").read_text()).get("sampling_rate", 16000)
        super().__init__(int(rate), folder=str(self.folder.resolve()), batch=batch,
                         model=self.model_stamp())
        self.model, self.extractor = self.load()
        self.model.eval()

    def model_stamp(self) -> str:
        """Name and size of the weight files: a different model in the same folder is another embedder."""
        files = [self.folder / w for w in WEIGHTS if (self.folder / w).exists()]
        return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)

    def load(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def embed(self, batch: Any, sample_rate: int | None = None) -> np.ndarray:
        import torch

        clips = self.check(batch, sample_rate)
        out = []
        with torch.no_grad():
            for start in range(0, len(clips), self.config["batch"]):
                part = [c for c in clips[start:start + self.config["batch"]]]
                out.append(self.vectors(part).float().numpy())
        return unit_rows(np.concatenate(out))

    def fit(self, corpus: Any, sample_rate: int | None = None) -> AudioEmbedder:
        return self  # pretrained: nothing to fit

    def fit_embed(self, corpus: Any, sample_rate: int | None = None) -> np.ndarray:
        return self.embed(corpus, sample_rate)

    def vectors(self, clips: list[np.ndarray]) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}


class ClapEmbedder(_HFAudioEmbedder):
    """CLAP's audio embedding (`ClapModel.get_audio_features`), from a local folder."""

    name = "clap"
    what = "CLAP"

    def load(self) -> tuple[Any, Any]:
        from transformers import ClapFeatureExtractor, ClapModel

        return ClapModel.from_pretrained(self.folder), ClapFeatureExtractor.from_pretrained(self.folder)

    def vectors(self, clips: list[np.ndarray]) -> Any:
        # clips longer than the extractor's window would be cut at random places: cut them here instead
        longest = int(getattr(self.extractor, "nb_max_samples", 0) or 0)
        clips = [c[:longest] if longest else c for c in clips]
        inputs = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt")
        features = self.model.get_audio_features(**inputs)
        return getattr(features, "pooler_output", features)


class MertEmbedder(_HFAudioEmbedder):
    """MERT (a HuBERT-style music model): hidden states averaged over layers and time, from a local folder.

    A folder whose config names its own code (`auto_map`, as MERT's snapshots do) loads it from the folder
    itself (`trust_remote_code` on local files only); otherwise `AutoModel` builds the architecture named in
    the config (HuBERT, wav2vec 2.0).
    """

    name = "mert"
    what = "MERT"

    def load(self) -> tuple[Any, Any]:
        from transformers import AutoFeatureExtractor, AutoModel

        config = json.loads((self.folder / "config.json").read_text())
        remote = "auto_map" in config
        model = AutoModel.from_pretrained(self.folder, trust_remote_code=remote, local_files_only=True)
        extractor = AutoFeatureExtractor.from_pretrained(self.folder, trust_remote_code=remote,
                                                         local_files_only=True)
        return model, extractor

    def vectors(self, clips: list[np.ndarray]) -> Any:
        import torch

        inputs = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt", padding=True)
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states
        return torch.stack(hidden).mean(0).mean(1)  # average of layers, then of time
