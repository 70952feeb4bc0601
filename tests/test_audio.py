"""Sound in clip shards: ``prepare --audio`` keeps each clip's sound aligned to its frames, marks
a clip without sound, and the ``fakeavceleb:`` source reads FakeAVCeleb's layout (a replica
written with PyAV, see ``av_data``) with its three labels and a split by identity; the loader
hands the sound and the per-stream labels to the model."""

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfake_dist.data import audio
from deepfake_dist.data.faces import VideoOptions
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.data.manifest import shard_urls, verify
from deepfake_dist.data.prepare import prepare
from deepfake_dist.data.sources import open_source
from deepfake_dist.errors import UserError
from deepfake_dist.options import PrepareOptions

pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless<5)")
pytest.importorskip("av", reason="sound needs the video extra (av)")
from av_data import CATEGORIES, CLIP, SAMPLE_RATE, write_av_video  # noqa: E402 - after the skips

FPS = 10.0


def samples_of(set_dir: Path) -> dict[str, list[dict]]:
    import webdataset as wds

    urls = {split: shard_urls(set_dir, split) for split in ("train", "val", "test")}
    return {split: list(wds.WebDataset(u, shardshuffle=False)) if u else [] for split, u in urls.items()}


def frame_tone(index: int) -> float:
    """The frequency (Hz) sounding while frame ``index`` shows."""
    return 400.0 + 150.0 * index


def dominant(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * SAMPLE_RATE / len(samples)


def test_a_clips_sound_spans_its_frames_and_a_silent_video_is_marked(tmp_path):
    frames = 16
    t = np.arange(round(frames / FPS * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.5 * np.sin(2 * np.pi * np.cumsum(frame_tone(0) + 150.0 * np.floor(t * FPS)) / SAMPLE_RATE)
    write_av_video(tmp_path / "v" / "real" / "tone.mp4", frames, FPS, identity=1, audio=tone.astype(np.float32))
    write_av_video(tmp_path / "v" / "fake" / "silent.mp4", frames, FPS, identity=2, fake_face=True)
    manifest = prepare(PrepareOptions(source=f"videos:{tmp_path / 'v'}", out=tmp_path / "out", resolution=32,
                                      split="1,0,0", options={**CLIP, "audio": True}))
    assert manifest["audio"] == {"sample_rate": SAMPLE_RATE, "channels": 1, "format": "wav", "clips": 2,
                                 "without_audio": 2, "samples": 7 * SAMPLE_RATE // 10}
    assert manifest["preprocessing"]["video"]["audio"] is True and verify(tmp_path / "out") == []
    by_video = defaultdict(list)
    for sample in samples_of(tmp_path / "out")["train"]:
        by_video[json.loads(sample["json"])["video"]].append(sample)
    for sample in by_video["real-tone"]:
        meta = json.loads(sample["json"])
        first, last = meta["frames"][0], meta["frames"][-1]
        assert (meta["audio"], meta["audio_start"], meta["audio_end"]) == (True, first / FPS, (last + 1) / FPS)
        sound = audio.decode(sample["wav"], "wav")
        per_frame = SAMPLE_RATE // int(FPS)
        assert len(sound) == meta["audio_samples"] == (last + 1 - first) * per_frame
        for k, index in enumerate(range(first, last + 1)):  # each frame's time holds that frame's tone
            middle = sound[k * per_frame + per_frame // 4:(k + 1) * per_frame - per_frame // 4]
            assert abs(dominant(middle) - frame_tone(index)) < 25, (index, dominant(middle))
    for sample in by_video["fake-silent"]:
        meta = json.loads(sample["json"])
        assert meta["audio"] is False and "no audio stream" in meta["audio_reason"]
        assert not {"wav", "flac"} & set(sample)  # kept, and never padded into silence
    loader = eval_loader([str(tmp_path / "out")], "train", EvalOptions(32, 3, batch_size=8, num_workers=0))
    batch = next(iter(loader))
    silent = [k.endswith(("fake-silent-c000", "fake-silent-c001")) for k in batch.key]
    assert batch.extra["has_audio"].tolist() == [not s for s in silent]
    assert batch.extra["audio"].shape == (4, manifest["audio"]["samples"])
    assert batch.extra["audio"][torch.tensor(silent)].abs().sum() == 0


def test_sound_needs_clips_of_consecutive_frames_and_a_known_format():
    with pytest.raises(UserError, match="--audio needs clips of consecutive frames"):
        VideoOptions(audio=True, frame_level=True)
    with pytest.raises(UserError, match="--audio needs clips of consecutive frames"):
        VideoOptions(audio=True, sampling="uniform")
    with pytest.raises(UserError, match="--audio-format mp3"):
        VideoOptions(audio=True, audio_format="mp3")
    for fmt in audio.AUDIO_FORMATS:  # 16-bit round trip
        wave = np.sin(np.linspace(0, 40, 3000)).astype(np.float32) * 0.7
        np.testing.assert_allclose(audio.decode(audio.encode(wave, fmt), fmt), wave, atol=1 / 32767)


def test_fakeavceleb_is_split_by_identity_with_each_categorys_labels(av_replica, av_shards):
    manifest = json.loads((av_shards / "manifest.json").read_text())
    dataset = manifest["preprocessing"]["dataset"]
    assert dataset["categories"] == av_replica.counts
    assert dataset["identities"] == {"train": 2, "val": 1, "test": 1}
    assert {Path(s["input"]).relative_to(av_replica.root).as_posix(): s["reason"] for s in manifest["skipped"]}.keys() \
        == av_replica.skipped.keys()
    assert manifest["audio"]["clips"] == 16 * 2 and manifest["audio"]["without_audio"] == 0
    assert verify(av_shards) == []
    split_of = defaultdict(set)
    for split, samples in samples_of(av_shards).items():
        for sample in samples:
            meta = json.loads(sample["json"])
            letter, fake_video, fake_audio = CATEGORIES[meta["category"]]
            assert (sample["video.cls"], sample["audio.cls"], sample["cls"]) == \
                (b"%d" % fake_video, b"%d" % fake_audio, b"%d" % (fake_video or fake_audio))
            assert (meta["label_video"], meta["label_audio"]) == (("real", "fake")[fake_video], ("real", "fake")[fake_audio])
            assert meta["category_letter"] == letter and meta["audio"] is True and "wav" in sample
            assert av_replica.splits[meta["identity"]] == split
            split_of[meta["identity"]].add(split)
    assert len(split_of) == 4 and all(len(s) == 1 for s in split_of.values())  # no identity on both sides

    batch = next(iter(eval_loader([str(av_shards)], "test", EvalOptions(32, 3, batch_size=16, num_workers=1))))
    metas = batch.meta
    assert batch.extra["label_video"].tolist() == [int(m["label_video"] == "fake") for m in metas]
    assert batch.extra["label_audio"].tolist() == [int(m["label_audio"] == "fake") for m in metas]
    assert batch.extra["has_audio"].all() and batch.extra["audio"].abs().amax(1).min() > 0.05


def test_fakeavceleb_layout_problems_are_one_line(av_replica, tmp_path):
    with pytest.raises(UserError, match="not the FakeAVCeleb layout: no RealVideo-RealAudio/"):
        open_source(f"fakeavceleb:{av_replica.root / 'FakeVideo-FakeAudio'}")
    broken = tmp_path / "broken"
    for category in CATEGORIES:
        (broken / category).mkdir(parents=True)
    with pytest.raises(UserError, match="missing the split file .*meta_data.csv"):
        open_source(f"fakeavceleb:{broken}")
    (broken / "meta_data.csv").write_text("source,target1,target2,method,category,type,race,gender,path,\n"
                                          "id1,-,-,real,B,RealVideo-RealAudio,African,men,00001.mp4,x\n")
    with pytest.raises(UserError, match=r"meta_data.csv:2: category 'B' with type 'RealVideo-RealAudio'"):
        open_source(f"fakeavceleb:{broken}")
    with pytest.raises(UserError, match="--identity-split 0.5,0.5: expected three fractions"):
        open_source(f"fakeavceleb:{av_replica.root}", options={"identity_split": "0.5,0.5"})
    with pytest.raises(UserError, match="--audio needs clips"):
        open_source(f"fakeavceleb:{av_replica.root}", options={"frame_level": True})


def test_a_flac_member_reads_as_its_wav(tmp_path):
    wave = (0.3 * np.sin(np.linspace(0, 300, 8000))).astype(np.float32)
    sample = {"flac": audio.encode(wave, "flac"), "video.cls": b"1"}
    extra = audio.decode_extra(sample, 0, 9000)
    assert extra["has_audio"] and extra["label_video"] == 1 and extra["label_audio"] == 0
    np.testing.assert_allclose(extra["audio"][:8000].numpy(), wave, atol=1 / 32767)
    assert extra["audio"][8000:].abs().sum() == 0
    with pytest.raises(ValueError, match="expected mono 16-bit 16000 Hz"):
        import wave as wavefile

        buffer = io.BytesIO()
        with wavefile.open(buffer, "wb") as out:
            out.setnchannels(2)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(bytes(8))
        audio.decode(buffer.getvalue(), "wav")
