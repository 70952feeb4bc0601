"""Where raw faces come from: ``open_source("KIND:ARG")`` and ``SOURCES``, every source kind.

A source spec is ``KIND:ARG`` (``builtin:lfw``, ``celeba:PATH``, ``folder:PATH``, ``videos:PATH``, and
the published deepfake video datasets ``ffpp:PATH``, ``celebdf:PATH``, ``dfdc:PATH``, ``dfdcp:PATH``,
``fakeavceleb:PATH``).
Opening one lists its inputs without decoding them: each ``Item`` carries a picklable ``load``
callable, so the decode happens later, in whichever worker process writes that item's shard.
An input usually yields one image; one that yields several samples (the clips of a video) returns
``Expanded`` from ``load``.

A new kind is one module in this package with a function ``(arg, label, **options) -> Source``
(``data.sources.base`` holds what kinds share, ``data.sources.video_sets`` what the published
video datasets share), and one line in ``SOURCES`` below (``options``: the names of the keyword
options it takes, which ``prepare(options=...)`` passes through).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from deepfake_dist.data.common import LABELS
from deepfake_dist.data.faces import VideoOptions
from deepfake_dist.data.sources import builtin, celeba, celebdf, dfdc, dfdcp, fakeavceleb, ffpp, folder, videos
from deepfake_dist.data.sources.base import Source
from deepfake_dist.errors import UserError
from deepfake_dist.registry import Registry

SOURCES = Registry("source")
SOURCES.register("builtin", usage="builtin:lfw")(builtin.open_builtin)
SOURCES.register("celeba", usage="celeba:PATH")(celeba.open_celeba)
SOURCES.register("folder", usage="folder:PATH")(folder.open_folder)
SOURCES.register("videos", usage="videos:PATH", options=videos.OPTIONS)(videos.open_videos)
SOURCES.register("ffpp", usage="ffpp:PATH", options=ffpp.OPTIONS)(ffpp.open_ffpp)
SOURCES.register("celebdf", usage="celebdf:PATH", options=celebdf.OPTIONS)(celebdf.open_celebdf)
SOURCES.register("dfdc", usage="dfdc:PATH", options=dfdc.OPTIONS)(dfdc.open_dfdc)
SOURCES.register("dfdcp", usage="dfdcp:PATH", options=dfdcp.OPTIONS)(dfdcp.open_dfdcp)
SOURCES.register("fakeavceleb", usage="fakeavceleb:PATH", options=fakeavceleb.OPTIONS)(fakeavceleb.open_fakeavceleb)

# The dataclasses that declare the source kinds' own options, each with the kinds that take it:
# ``deepfake-dist prepare`` shows them as its flags, a prepare stage takes them as ``options``.
OPTION_GROUPS = (
    (VideoOptions, "videos:PATH (folders real/ fake/ of videos, or a CSV path,label,split); ffpp, celebdf, dfdc, dfdcp "
                   "take them too (their default: 32 frames a video spread uniformly, one sample a frame, 256 px), and "
                   "fakeavceleb (its default: 4 clips of 8 frames, every 3rd, with their sound)"),
    (ffpp.FfppOptions, "ffpp:PATH"),
    (fakeavceleb.FakeavcelebOptions, "fakeavceleb:PATH"),
)


def open_source(spec: str, label: str | None = None, options: dict[str, Any] | None = None) -> Source:
    """Parse ``KIND:ARG`` and list the source's items. ``label`` ("real"/"fake") is only for a
    flat folder; ``options`` go to the kinds registered as taking them (``videos``, ``ffpp``...).
    Raises ``UserError`` naming the spec, path or file at fault."""
    if label is not None and label not in LABELS:
        raise UserError(f"--label {label!r}: expected 'real' or 'fake'")
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise UserError(f"--source {spec!r}: expected KIND:ARG, one of: {usage()}")
    try:
        fn = SOURCES.get(kind)
    except UserError as err:
        raise UserError(f"--source {spec!r}: {err}") from None
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = [k for k in options if k not in SOURCES.meta(kind).get("options", ())]
    if unknown:
        takers = [SOURCES.meta(n)["usage"] for n in SOURCES.names() if unknown[0] in SOURCES.meta(n).get("options", ())]
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        if not takers:
            raise UserError(f"{flags}: no source kind takes it; drop it")
        raise UserError(f"{flags}: only for {' | '.join(takers)} sources, not {spec}; drop them")
    source = fn(arg, label, **options)
    source.spec = spec
    dupes = [k for k, n in Counter(item.key for item in source.items).items() if n > 1]
    if dupes:  # a bug in the source kind, not the user's input
        raise RuntimeError(f"source {spec!r} produced duplicate keys: {dupes[:5]}")
    return source


def usage() -> str:
    return ", ".join(SOURCES.meta(name).get("usage", f"{name}:ARG") for name in SOURCES.names())
