"""A clip's sound: decoded from the video with PyAV, cut to the clip's frames, stored beside them
and read back by the loader.

``prepare --audio`` (``VideoOptions.audio``) keeps each clip's audio: the video's audio track is
decoded once (PyAV, which bundles FFmpeg), resampled to 16 kHz mono, and each clip gets the
stretch from the start of its first frame to the end of its last, ``frames[0] / fps`` to
``(frames[-1] + 1) / fps`` on the video stream's clock (the two streams' start times are taken
into account, so an audio track that starts late stays aligned). It is stored as a member
``wav`` (16-bit PCM) or ``flac`` of the clip sample; the sample's json records ``audio: true``,
the window (``audio_start``, ``audio_end`` in seconds) and its length (``audio_samples``). A clip
the track does not cover (no audio stream, one that cannot be decoded, or one that ends or starts
more than ``EDGE_TOLERANCE_S`` away from the clip's edges) is kept with ``audio: false`` and
``audio_reason``, and no sound member: it is never padded into a silence that looks real. Within
the tolerance (codec framing) the missing edge is padded with zeros and ``audio_padded`` says
how many samples.

The loader (``decode_extra``) hands the model a fixed-length waveform per sample: the longest
clip of the sets (the manifest's ``audio.samples``; clips of one frame rate all have the same
length), zero-padded at the end for a shorter clip and cut at the end for a longer one, with
``has_audio`` false for a clip without sound, and the per-stream labels (members ``video.cls``
and ``audio.cls``, written by sources that know them, e.g. FakeAVCeleb; the sample's ``cls``
otherwise).
"""

from __future__ import annotations

import io
import wave as wavefile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfake_dist.data.manifest import load_manifest
from deepfake_dist.errors import UserError

SAMPLE_RATE = 16000
AUDIO_FORMATS = ("wav", "flac")
EDGE_TOLERANCE_S = 0.025  # audio codecs work in frames of ~1024 samples: a track may stop this short of the video
STREAM_LABELS = {"label_video": "video.cls", "label_audio": "audio.cls"}  # extra key -> tar member


@dataclass
class Track:
    """A video's audio, decoded: ``wave`` (float32 mono at ``SAMPLE_RATE``) whose first sample
    plays ``start`` seconds after the video stream's first frame; or, when there is none to use,
    ``wave`` None and the ``reason``."""

    wave: np.ndarray | None
    start: float = 0.0
    reason: str = ""


def read_track(path: str | Path, until: float) -> Track:
    """The audio of ``path`` up to ``until`` seconds of the video (decoding stops there)."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        return Track(None, reason=f"PyAV cannot open it ({err})")
    with container:
        if not container.streams.audio:
            return Track(None, reason="the video has no audio stream")
        stream = container.streams.audio[0]
        video = container.streams.video[0] if container.streams.video else None
        video_start = float(video.start_time * video.time_base) if video is not None and video.start_time else 0.0
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, start = [], None
        try:
            for frame in container.decode(stream):
                if start is None:
                    start = float(frame.time if frame.time is not None else 0.0) - video_start
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
                if start + sum(map(len, chunks)) / SAMPLE_RATE > until + EDGE_TOLERANCE_S:
                    break
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        except (av.FFmpegError, ValueError) as err:
            return Track(None, reason=f"its audio stream cannot be decoded ({err})")
    if start is None or not chunks:
        return Track(None, reason="its audio stream holds no sound")
    return Track(np.concatenate(chunks).astype(np.float32), start)


def clip_window(frames: list[int], fps: float) -> tuple[float, float]:
    """Seconds from the start of the clip's first frame to the end of its last."""
    return frames[0] / fps, (frames[-1] + 1) / fps


def cut(track: Track, start: float, end: float) -> tuple[np.ndarray | None, int, str]:
    """(samples from ``start`` to ``end`` seconds, zeros padded at the edges, reason when None)."""
    if track.wave is None:
        return None, 0, track.reason
    n = round((end - start) * SAMPLE_RATE)
    first = round((start - track.start) * SAMPLE_RATE)
    before, after = max(0, -first), max(0, first + n - len(track.wave))
    if max(before, after) > EDGE_TOLERANCE_S * SAMPLE_RATE:
        covered = f"{track.start:.3f}-{track.start + len(track.wave) / SAMPLE_RATE:.3f} s"
        return None, 0, f"the audio track covers {covered}, not the clip's {start:.3f}-{end:.3f} s"
    piece = track.wave[max(first, 0):first + n]
    return np.pad(piece, (before, n - before - len(piece))), before + after, ""


def clip_sounds(clips: list[list[int]], path: str | Path, fps: float) -> list[tuple[np.ndarray | None, dict[str, Any]]]:
    """Each clip's sound (None when the track does not cover it) and the json fields that say so
    (see the module)."""
    windows = [clip_window(frames, fps) for frames in clips]
    track = read_track(path, max((end for _, end in windows), default=0.0))
    sounds = []
    for start, end in windows:
        piece, padded, reason = cut(track, start, end)
        meta = {"audio": False, "audio_reason": reason} if piece is None else {
            "audio": True, "audio_start": round(start, 4), "audio_end": round(end, 4), "audio_samples": len(piece),
            "sample_rate": SAMPLE_RATE, **({"audio_padded": padded} if padded else {})}
        sounds.append((piece, meta))
    return sounds


def attach_audio(samples: list, path: str | Path, fps: float, fmt: str) -> None:
    """Give each clip sample (``data.common.Sample`` with ``meta["frames"]``) its sound as a
    member ``fmt`` and its json fields, or ``audio: false`` and the reason (see the module)."""
    if fmt not in AUDIO_FORMATS:
        raise UserError(f"--audio-format {fmt}: expected one of {', '.join(AUDIO_FORMATS)}")
    for sample, (piece, meta) in zip(samples, clip_sounds([s.meta["frames"] for s in samples], path, fps)):
        if piece is not None:
            sample.members[fmt] = encode(piece, fmt)
        sample.meta.update(meta)


# ------------------------------------------------------------------------------- encoding


def encode(samples: np.ndarray, fmt: str) -> bytes:
    """float mono samples in [-1, 1] at ``SAMPLE_RATE`` -> a 16-bit WAV or FLAC file's bytes."""
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    if fmt == "wav":
        with wavefile.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(pcm.tobytes())
        return buffer.getvalue()
    import av

    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def decode(data: bytes, fmt: str) -> np.ndarray:
    """A ``wav`` or ``flac`` member -> float32 mono samples (it must be 16 kHz mono, as prepared)."""
    if fmt == "wav":
        with wavefile.open(io.BytesIO(data), "rb") as src:
            shape = (src.getnchannels(), src.getsampwidth(), src.getframerate())
            if shape != (1, 2, SAMPLE_RATE):
                raise ValueError(f"the wav member is {shape[0]} channel(s), {8 * shape[1]}-bit, {shape[2]} Hz; "
                                 f"expected mono 16-bit {SAMPLE_RATE} Hz")
            return np.frombuffer(src.readframes(src.getnframes()), "<i2").astype(np.float32) / 32768
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        if stream.rate != SAMPLE_RATE or stream.channels != 1:
            raise ValueError(f"the flac member is {stream.channels} channel(s) at {stream.rate} Hz; expected mono "
                             f"{SAMPLE_RATE} Hz")
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    return (pcm.astype(np.float32) / 32768) if pcm.dtype == np.int16 else pcm.astype(np.float32)


# --------------------------------------------------------------------------------- loading


def audio_samples(sets: list[str]) -> int | None:
    """Samples of the fixed-length waveform the loader hands over for these sets: the longest
    clip of those prepared with ``--audio`` (``None`` when none was)."""
    lengths = [(load_manifest(s).get("audio") or {}).get("samples") for s in sets]
    lengths = [n for n in lengths if n is not None]
    return max(lengths) if lengths else None


def fit_length(samples: np.ndarray | None, length: int) -> torch.Tensor:
    """``length`` float32 samples: the sound cut at the end, or zero-padded there (all zeros for none)."""
    out = torch.zeros(length)
    if samples is not None:
        kept = torch.from_numpy(np.ascontiguousarray(samples[:length], dtype=np.float32))
        out[:len(kept)] = kept
    return out


def decode_extra(sample: dict[str, Any], label: int, length: int) -> dict[str, torch.Tensor]:
    """What a sample carries besides its frames: ``audio`` (``length`` float32 samples), ``has_audio``
    and the per-stream labels ``label_video`` and ``label_audio`` (the sample's label where its
    set gives none)."""
    key = next((k for k in AUDIO_FORMATS if k in sample), None)
    extra = {"audio": fit_length(None if key is None else decode(sample[key], key), length),
             "has_audio": torch.tensor(key is not None)}
    for name, member in STREAM_LABELS.items():
        extra[name] = torch.tensor(int(sample[member]) if member in sample else label)
    return extra
