"""Videos with sound for the audio-visual tests and benchmark, written with PyAV (H.263-style
mpeg4 video and AAC audio in mp4), and a tiny FakeAVCeleb replica in its published layout.

A person is one of scikit-image's bundled LFW faces (``benchmark_replicas.portrait``) moving over
a background (``video_data.face_frames``) with a dark mouth that opens with the loudness of their
voice. A voice is a tone, not speech (espeak-ng is not installed here): a harmonic series at the
person's own pitch (110-164 Hz), in syllable-like bursts at the person's own rhythm. The
replica's fakes are made the way the categories describe: a cloned voice is the same voice
pitch-shifted up and spoken at another rhythm (so the mouth no longer follows it), a fake face is
the face blended with a shifted copy of itself, noised and blurred.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from benchmark_replicas import portrait
from video_data import SIZE, face_frames

SAMPLE_RATE = 16000
CATEGORIES = {"RealVideo-RealAudio": ("A", False, False), "RealVideo-FakeAudio": ("B", False, True),
              "FakeVideo-RealAudio": ("C", True, False), "FakeVideo-FakeAudio": ("D", True, True)}
RACES = (("African", "men"), ("Asian (East)", "women"))
HEADER = "source,target1,target2,method,category,type,race,gender,path,"
CLIP = {"frames": 4, "clips_per_video": 2, "frame_step": 2, "margin": 0.5}  # prepare's options: 2 clips of a 16-frame video


def voice(identity: int, seconds: float, cloned: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(samples at 16 kHz, loudness envelope in [0, 1] per sample) of ``identity``'s voice; a
    ``cloned`` voice is pitch-shifted up by 1.8x and keeps another rhythm."""
    rng = np.random.default_rng(identity)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rhythm, phase = 3.0 + rng.random(), rng.random() * 2 * np.pi
    if cloned:
        rhythm, phase = rhythm * 1.35, phase + 1.7
    envelope = np.clip(np.sin(2 * np.pi * rhythm * t + phase), 0, None) ** 2 * (0.7 + 0.3 * np.sin(2 * np.pi * 0.6 * t))
    pitch = (110 + 6 * (identity % 10)) * (1.8 if cloned else 1.0) * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
    angle = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    tone = sum(np.sin(k * angle) / k for k in range(1, 7)) / 2.5
    return (0.5 * envelope * tone).astype(np.float32), envelope


def write_av_video(path: Path, frames: int, fps: float = 10.0, identity: int = 0, fake_face: bool = False,
                   audio: np.ndarray | None = None, mouth: np.ndarray | None = None,
                   size: tuple[int, int] = SIZE) -> Path:
    """An mp4 of ``frames`` frames of ``identity``'s face (``fake_face``: blended, noised and
    blurred), its mouth opened by ``mouth`` (a loudness per audio sample; None: closed), with the
    ``audio`` track (16 kHz mono samples; None: no audio stream)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        sound = None if audio is None else container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for i, (frame, (x, y, side)) in enumerate(face_frames(frames, fake_face, True, identity, size, portrait(identity))):
            opening = 0.0 if mouth is None else float(mouth[min(round((i + 0.5) / fps * SAMPLE_RATE), len(mouth) - 1)])
            cv2.ellipse(frame, (x + side // 2, y + round(0.8 * side)), (round(0.18 * side), 1 + round(0.12 * side * opening)),
                        0, 0, 360, (40, 15, 15), -1)
            if fake_face:
                frame[y:y + side, x:x + side] = cv2.GaussianBlur(frame[y:y + side, x:x + side], (0, 0), 1.2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if sound is not None:
            pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)[None]
            chunk = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = SAMPLE_RATE, 0
            for packet in [*sound.encode(chunk), *sound.encode(None)]:
                container.mux(packet)
    return path


def person_video(path: Path, identity: int, frames: int, fps: float, fake_face: bool = False,
                 fake_voice: bool = False, sound: bool = True) -> Path:
    """``identity`` speaking: the mouth follows their real voice; the track is that voice, or
    their cloned voice (``fake_voice``), or none (``sound`` false)."""
    seconds = frames / fps + 0.2
    real, envelope = voice(identity, seconds)
    track = voice(identity, seconds, cloned=True)[0] if fake_voice else real
    return write_av_video(path, frames, fps, identity, fake_face, track if sound else None, envelope)


@dataclass
class AVReplica:
    """A FakeAVCeleb replica: its root, each identity's split, videos per split and category, and
    the files the source must skip (relative to root) with a word of the reason."""

    root: Path
    splits: dict[str, str]
    counts: dict[str, dict[str, int]]
    skipped: dict[str, str]


def build_fakeavceleb(root: Path, identities: int = 8, frames: int = 16, fps: float = 10.0,
                      splits: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> AVReplica:
    """``identities`` people (``id00000``...), one video of each category each, filed under
    ``CATEGORY/RACE/GENDER/IDENTITY/`` with ``meta_data.csv`` at the root as FakeAVCeleb v1.2 has
    it; a fake borrows the next identity's face or voice (``target1``). Plus a listed video that
    is missing and a video that is not listed. The identity split the source will draw is
    recomputed here with its function, so the expected counts are exact."""
    from deepfake_dist.data.sources.fakeavceleb import _identity_splits

    rows = [HEADER]
    names = [f"id{k:05d}" for k in range(identities)]
    for k, name in enumerate(names):
        race, gender = RACES[k % len(RACES)]
        target = names[(k + 1) % identities]
        for category, (letter, fake_face, fake_voice) in CATEGORIES.items():
            method, file = {"A": ("real", "00001.mp4"), "B": ("rtvc", "00001_fake.mp4"),
                            "C": ("faceswap", f"00001_{target}_faceswap.mp4"),
                            "D": ("wav2lip", f"00001_3_{target}_wavtolip.mp4")}[letter]
            folder = Path(category, race, gender, name)
            person_video(root / folder / file, k, frames, fps, fake_face, fake_voice)
            rows.append(f"{name},{'-' if letter == 'A' else target},{'3' if letter == 'D' else '-'},{method},{letter},"
                        f"{category},{race},{gender},{file},FakeAVCeleb/{folder.as_posix()}")
    rows.append(f"{names[0]},-,-,real,A,RealVideo-RealAudio,African,men,00009.mp4,"
                f"FakeAVCeleb/RealVideo-RealAudio/African/men/{names[0]}")  # listed, not on disk
    person_video(root / "RealVideo-RealAudio/African/men" / names[0] / "00002.mp4", 0, frames, fps)  # not listed
    (root / "meta_data.csv").write_text("\n".join(rows) + "\n")
    split_of = _identity_splits(set(names), splits)
    counts = {s: {c: sum(1 for n in names if split_of[n] == s) for c in CATEGORIES} for s in ("train", "val", "test")}
    skipped = {f"RealVideo-RealAudio/African/men/{names[0]}/00009.mp4": "missing",
               f"RealVideo-RealAudio/African/men/{names[0]}/00002.mp4": "not listed"}
    return AVReplica(root, split_of, counts, skipped)
