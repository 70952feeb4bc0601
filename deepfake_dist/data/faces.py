"""Videos -> face crops: the frame and face pipeline. Every video source kind
(``data.sources.videos``) cuts its videos with ``video_samples``, and scoring a video
(``deepfake-dist predict``) with ``video_faces`` + ``cut_samples``, so inference sees what
training saw; a still image's face is found and cropped the same way (``largest_face``).

A video yields several samples (``Expanded``): one per clip (K frames, members ``f000.<fmt>``,
``f001.<fmt>``, ... in time order) or, with ``frame_level``, one per frame.

Per video, in the worker that writes its shard:

1. plan the frame indices of each clip from the frame count: ``step`` takes K frames every n-th
   frame (clips centred in N equal parts of the video), ``uniform`` spreads all N*K frames
   evenly over the video and cuts them into N clips; clips never overlap, so a short video
   gives fewer clips (recorded) or none (skipped; with ``keep_short`` it gives one shorter clip
   of the frames it has, recorded with its count);
2. decode exactly those frames in one sequential pass (grab/retrieve: exact indices, no seeking);
3. detect faces on each sampled frame: OpenCV's bundled Haar cascade, or a DNN SSD face
   detector (``cv2.dnn``) from a local model file;
4. within each clip, link the detections frame to frame into tracks by IoU and keep the largest
   track (the largest summed box area: big and present on most frames);
5. per clip: frames where the track has no detection get a box interpolated from its neighbours
   (or held at the ends); a clip needs a detection on at least half of its frames (a frame-level
   sample on its own frame), else it is dropped and recorded; the boxes are smoothed over time
   (moving average of 3) and cut as a square of side ``max(w, h) * (1 + 2 * margin)`` around
   the box centre (black outside the frame). ``prepare`` then resizes every crop to the set's
   resolution (bicubic).
6. with ``audio``, each clip's sound from the start of its first frame to the end of its last
   (``data.audio``), stored beside its frames.

A video that cannot be decoded, is too short for one clip or shows no face raises
``VideoError``, so ``prepare`` skips it and lists it in the manifest's ``skipped`` with the reason.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepfake_dist.data import imageio
from deepfake_dist.data.audio import AUDIO_FORMATS, SAMPLE_RATE, attach_audio
from deepfake_dist.data.common import Expanded, Sample
from deepfake_dist.data.manifest import file_sha256, load_manifest
from deepfake_dist.errors import UserError
from deepfake_dist.options import option

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
SAMPLINGS = ("step", "uniform")
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
TRACK_IOU = 0.2  # a detection joins a track when it overlaps the track's last box this much
MIN_DETECTED = 0.5  # a clip needs its own face detection on this fraction of its frames
SMOOTH = 3  # moving-average window over a clip's boxes (frames)
DETECT_MAX_SIDE = 480  # frames are downscaled to this for detection (boxes scaled back): Haar's cost grows with pixels
HAAR_PARAMS = {"scaleFactor": 1.1, "minNeighbors": 5, "minSize": (24, 24)}  # at DETECT_MAX_SIDE
DNN_INPUT, DNN_MEAN, DNN_CONFIDENCE = 300, (104.0, 177.0, 123.0), 0.5  # OpenCV's res10 SSD face detector

Box = tuple[float, float, float, float]  # x, y, w, h in frame pixels


@dataclass(frozen=True)
class VideoOptions:
    """How clips are cut from a video: a ``videos:`` source's options, ``deepfake-dist prepare``'s
    flags (``clips_per_video`` -> ``--clips-per-video``) and a prepare stage's ``options``.
    Recorded in the manifest."""

    frames: int = option(8, "frames per clip")
    clips_per_video: int = option(4, "clips per video, fewer when it is short")
    frame_step: int = option(2, "n for --sampling step")
    sampling: str = option("step", "step: consecutive frames, every n-th; uniform: spread over the video",
                           choices=SAMPLINGS)
    margin: float = option(0.15, "face crop margin on each side, fraction of the box")
    face_model: str | None = option(None, "a local cv2.dnn SSD face detector (default: OpenCV's Haar cascade)")
    face_config: str | None = option(None, "its network description, e.g. deploy.prototxt for Caffe")
    frame_level: bool = option(False, "one sample per frame (for image detectors) instead of one per clip")
    keep_short: bool = option(False, "a video shorter than one clip keeps the frames it has, listed in the "
                                     "manifest (frame-level sets only)")
    audio: bool = option(False, "keep each clip's sound (16 kHz mono, aligned to its frames) beside its frames "
                                "(clip sets with --sampling step)")
    audio_format: str = option("wav", "how --audio stores the sound: wav (16-bit PCM) or flac", choices=AUDIO_FORMATS)

    def __post_init__(self):
        for name, low in (("frames", 1), ("clips_per_video", 1), ("frame_step", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"--{name.replace('_', '-')} {value}: expected an integer >= {low}")
        if self.sampling not in SAMPLINGS:
            raise UserError(f"--sampling {self.sampling}: expected one of {', '.join(SAMPLINGS)}")
        if not isinstance(self.margin, (int, float)) or not 0 <= self.margin <= 2:
            raise UserError(f"--margin {self.margin}: expected a fraction of the face box from 0 to 2, e.g. 0.15")
        for flag, path in (("--face-model", self.face_model), ("--face-config", self.face_config)):
            if path is not None and not Path(path).expanduser().is_file():
                raise UserError(
                    f"{flag} {path}: file not found; give a local OpenCV DNN face detector, e.g. "
                    "--face-model res10_300x300_ssd_iter_140000.caffemodel --face-config deploy.prototxt "
                    "(or an SSD .onnx), or leave it out for the bundled Haar cascade"
                )
        if self.face_config is not None and self.face_model is None:
            raise UserError(f"--face-config {self.face_config}: give the model too (--face-model PATH)")
        if self.keep_short and not self.frame_level:  # a clip model needs every clip at full length
            raise UserError("keep_short needs frame_level: a clip-level set holds only full clips")
        if self.audio and (self.frame_level or self.sampling != "step"):  # a frame has no sound of its own
            raise UserError("--audio needs clips of consecutive frames (--sampling step, without --frame-level): "
                            "their sound is one stretch of the same length for every clip")
        if self.audio_format not in AUDIO_FORMATS:
            raise UserError(f"--audio-format {self.audio_format}: expected one of {', '.join(AUDIO_FORMATS)}")

    def settings(self) -> dict[str, Any]:
        """What the manifest records: these options, the detector (with the model file's
        sha256) and the fixed tracking constants."""
        out = {k: v for k, v in asdict(self).items() if k not in ("face_model", "face_config")}
        if self.face_model is None:
            out["face_detector"] = {"kind": "haar", "cascade": HAAR_CASCADE, **HAAR_PARAMS, "opencv": _cv2().__version__}
        else:
            out["face_detector"] = {
                "kind": "dnn", "model": str(self.face_model), "model_sha256": file_sha256(Path(self.face_model).expanduser()),
                "config": self.face_config, "input": DNN_INPUT, "mean": list(DNN_MEAN), "confidence": DNN_CONFIDENCE,
                "opencv": _cv2().__version__,
            }
        if self.audio:
            out["audio_sample_rate"] = SAMPLE_RATE
        return {"crop": "face", **out, "track_iou": TRACK_IOU, "min_detected": MIN_DETECTED, "box_smoothing": SMOOTH,
                "detect_max_side": DETECT_MAX_SIDE}


VIDEO_OPTIONS = tuple(f.name for f in fields(VideoOptions))  # the keyword options of a video source kind


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("videos need OpenCV: pip install 'deepfake_dist[video]' (opencv-python-headless<5)") from None
    return cv2


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".") and path.is_file()


# -------------------------------------------------------------------------------- sampling


def clip_indices(n_frames: int, opts: VideoOptions) -> list[list[int]]:
    """Frame indices of each clip, in time order (non-overlapping clips; fewer than
    ``clips_per_video`` when the video is too short, none when not even one fits, or with
    ``keep_short`` one clip of the frames there are)."""
    k, n_clips = opts.frames, opts.clips_per_video
    if opts.keep_short and 0 < n_frames < (k if opts.sampling == "uniform" else (k - 1) * opts.frame_step + 1):
        return [list(range(0, n_frames, 1 if opts.sampling == "uniform" else opts.frame_step))]
    if opts.sampling == "uniform":
        n_clips = min(n_clips, n_frames // k)
        total = n_clips * k
        flat = [int((j + 0.5) * n_frames / total) for j in range(total)]
        return [flat[c * k : (c + 1) * k] for c in range(n_clips)]
    span = (k - 1) * opts.frame_step + 1
    n_clips = min(n_clips, n_frames // span)
    clips = []
    for c in range(n_clips):  # each clip centred in its 1/n_clips of the video
        start = int(c * n_frames / n_clips + (n_frames / n_clips - span) / 2)
        clips.append(list(range(start, start + span, opts.frame_step)))
    return clips


def _span_text(opts: VideoOptions) -> str:
    every = f"every {opts.frame_step}" if opts.sampling == "step" else "spread uniformly"
    return f"{opts.frames} frames ({every})"


# -------------------------------------------------------------------------------- decoding


class VideoError(Exception):
    """A video that yields nothing: the message is the reason recorded in the manifest."""


def read_frames(path: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int | None]:
    """The wanted frames as RGB arrays, in one sequential pass; also the true frame count when
    the video ended before the last wanted frame (``None`` when it did not)."""
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError("OpenCV cannot open it (not a video, damaged, or a codec its FFmpeg lacks)")
    frames: dict[int, np.ndarray] = {}
    index, last = 0, max(wanted, default=-1)
    try:
        while index <= last:
            if not cap.grab():
                return frames, index
            if index in wanted:
                ok, bgr = cap.retrieve()
                if ok:
                    frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()
    return frames, None


def probe(path: str) -> tuple[int, float]:
    """(frame count, fps) from the container; counts by decoding when the header has none."""
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError("OpenCV cannot open it (not a video, damaged, or a codec its FFmpeg lacks)")
    try:
        count, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))
        if count <= 0:
            count = 0
            while cap.grab():
                count += 1
    finally:
        cap.release()
    return count, fps


def sample_frames(path: str, opts: VideoOptions) -> tuple[list[list[int]], dict[int, np.ndarray], int, float]:
    """(clips, frames by index, frame count, fps); re-plans once when the header overstated the
    frame count (a truncated file)."""
    n_frames, fps = probe(path)
    for _ in range(2):
        clips = clip_indices(n_frames, opts)
        if not clips:
            raise VideoError(f"{n_frames} frame(s): too short for one clip of {_span_text(opts)}")
        frames, actual = read_frames(path, {i for clip in clips for i in clip})
        if actual is None or all(i in frames for clip in clips for i in clip):
            return clips, frames, n_frames, fps
        n_frames = actual
    raise VideoError(f"frames could not be decoded after frame {n_frames}")


# ------------------------------------------------------------------------------- detection


class HaarFaces:
    """OpenCV's bundled frontal-face Haar cascade (``cv2.data.haarcascades``)."""

    def __init__(self):
        cv2 = _cv2()
        path = Path(cv2.data.haarcascades) / HAAR_CASCADE
        self.cascade = cv2.CascadeClassifier(str(path)) if hasattr(cv2, "CascadeClassifier") else None
        if self.cascade is None or self.cascade.empty():
            raise UserError(
                f"OpenCV {cv2.__version__} ships no Haar cascade {HAAR_CASCADE} (OpenCV 5 moved them out): "
                "pip install 'opencv-python-headless<5', or give a DNN face detector with --face-model PATH"
            )

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        cv2 = _cv2()
        grey, scale = _detection_image(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        found = self.cascade.detectMultiScale(grey, **HAAR_PARAMS)
        return [tuple(float(v) / scale for v in box) for box in found]


class DnnFaces:
    """A ``cv2.dnn`` SSD face detector from a local file (OpenCV's res10 300x300 Caffe model or
    any network with the same output: rows of (image, class, confidence, x1, y1, x2, y2) with
    coordinates relative to the frame)."""

    def __init__(self, model: str, config: str | None):
        cv2 = _cv2()
        try:
            self.net = cv2.dnn.readNet(str(Path(model).expanduser()), str(Path(config).expanduser()) if config else "")
        except cv2.error as e:
            detail = str(e).strip().splitlines()[-1]
            raise UserError(f"--face-model {model}: OpenCV cannot load it as a DNN ({detail}); "
                            "a Caffe model also needs --face-config deploy.prototxt") from None

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        cv2 = _cv2()
        h, w = rgb.shape[:2]
        blob = cv2.dnn.blobFromImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1.0, (DNN_INPUT, DNN_INPUT), DNN_MEAN)
        self.net.setInput(blob)
        out = np.asarray(self.net.forward())
        if out.size % 7:
            raise UserError(f"the --face-model output has shape {out.shape}; expected SSD detections (..., 7)")
        boxes = []
        for _, _, conf, x1, y1, x2, y2 in out.reshape(-1, 7):
            x1, x2 = np.clip([x1, x2], 0, 1) * w
            y1, y2 = np.clip([y1, y2], 0, 1) * h
            if conf >= DNN_CONFIDENCE and x2 > x1 and y2 > y1:
                boxes.append((float(x1), float(y1), float(x2 - x1), float(y2 - y1)))
        return boxes


def _detection_image(grey: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = grey.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if scale < 1.0:
        grey = _cv2().resize(grey, (round(w * scale), round(h * scale)), interpolation=_cv2().INTER_AREA)
    return grey, scale


@functools.lru_cache(maxsize=4)
def face_detector(model: str | None = None, config: str | None = None):
    """The detector for these options, built once per process (OpenCV objects do not pickle)."""
    return HaarFaces() if model is None else DnnFaces(model, config)


def check_detector(opts: VideoOptions) -> None:
    """Build the options' face detector once, so a source fails as it is opened (a model file
    OpenCV cannot load, an OpenCV without the Haar cascade) rather than once per video."""
    if opts.face_model is not None:
        face_detector(opts.face_model, opts.face_config)
    else:
        HaarFaces()


# -------------------------------------------------------------------------------- tracking


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def largest_track(detections: dict[int, list[Box]]) -> dict[int, Box]:
    """Link detections frame to frame (each to the track whose last box it overlaps most, IoU >=
    ``TRACK_IOU``; else it starts a track) and return the track with the largest summed area."""
    tracks: list[dict[int, Box]] = []
    for index in sorted(detections):
        taken: set[int] = set()
        for box in sorted(detections[index], key=lambda b: b[2] * b[3], reverse=True):
            scores = [(iou(t[max(t)], box), k) for k, t in enumerate(tracks) if k not in taken]
            best = max(scores, default=(0.0, -1))
            if best[0] >= TRACK_IOU:
                tracks[best[1]][index] = box
                taken.add(best[1])
            else:
                tracks.append({index: box})
                taken.add(len(tracks) - 1)
    return max(tracks, key=lambda t: sum(b[2] * b[3] for b in t.values()), default={})


def fill_boxes(indices: list[int], track: dict[int, Box]) -> list[Box]:
    """The track's box at each index: its detection, else linear interpolation between the
    nearest detections before and after, else the nearest one (the track must not be empty)."""
    known = sorted(track)
    out = []
    for i in indices:
        before = [k for k in known if k <= i]
        after = [k for k in known if k >= i]
        if before and after and before[-1] != after[0]:
            a, b = before[-1], after[0]
            t = (i - a) / (b - a)
            out.append(tuple(pa + t * (pb - pa) for pa, pb in zip(track[a], track[b])))
        else:
            out.append(track[before[-1] if before else after[0]])
    return out


def smooth(boxes: list[Box], window: int = SMOOTH) -> list[Box]:
    """Centred moving average of the boxes (shorter at the ends): less frame-to-frame jitter."""
    half = window // 2
    arr = np.asarray(boxes, dtype=np.float64)
    return [tuple(arr[max(0, i - half) : i + half + 1].mean(0).tolist()) for i in range(len(arr))]


def crop_face(rgb: np.ndarray, box: Box, margin: float) -> Image.Image:
    """A square of side ``max(w, h) * (1 + 2 * margin)`` centred on the box; black outside."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = max(round(side), 1)
    return Image.fromarray(rgb).crop((left, top, left + size, top + size))


STILL_MARGIN = 0.25  # of the face box, added on every side of a still image's face crop
_STILL = threading.Lock()


def largest_face(img: Image.Image, margin: float = STILL_MARGIN) -> tuple[Image.Image, dict]:
    """A still image's largest face, found and cropped as a video's are (OpenCV's Haar cascade,
    ``crop_face``), and what was found: ``{"detected", "faces", "box": [x, y, w, h]}``. With no
    face the whole image comes back (``detected`` false), so the caller can still score it."""
    rgb = np.asarray(imageio.to_mode(img, "RGB"))
    with _STILL:  # the server calls this from many threads; OpenCV's detector is shared, not thread-safe
        boxes = face_detector()(rgb)
    if not boxes:
        return img, {"detected": False, "faces": 0, "box": None}
    box = max(boxes, key=lambda b: b[2] * b[3])
    return crop_face(rgb, box, margin), {"detected": True, "faces": len(boxes), "box": [round(v) for v in box]}


# --------------------------------------------------------------------------------- samples


@dataclass
class VideoFaces:
    """A decoded video: its planned clips, the sampled frames (RGB) and each clip's face track."""

    clips: list[list[int]]
    frames: dict[int, np.ndarray]
    tracks: list[dict[int, Box]]  # per clip: its largest face track (empty: no face)
    n_frames: int
    fps: float

    @property
    def without_face(self) -> int:
        """Sampled frames on which their clip's track has no detection."""
        return sum(i not in track for clip, track in zip(self.clips, self.tracks) for i in clip)


def video_faces(path: str, opts: VideoOptions) -> VideoFaces:
    """Decode the sampled frames, detect faces and keep each clip's largest face track (tracks
    are linked within a clip, whose frames are close in time; clips may be seconds apart).
    Raises ``VideoError`` when the video cannot be read, is too short or shows no face."""
    clips, frames, n_frames, fps = sample_frames(path, opts)
    detect = face_detector(opts.face_model, opts.face_config)
    found = {i: detect(frames[i]) for i in sorted(frames)}
    tracks = [largest_track({i: found[i] for i in clip}) for clip in clips]
    if not any(tracks):
        raise VideoError(f"no face found on its {len(frames)} sampled frame(s)")
    return VideoFaces(clips, frames, tracks, n_frames, fps)


def cut_samples(video: VideoFaces, opts: VideoOptions) -> Expanded:
    """One sample per clip, or per frame with ``frame_level`` (only frames with their own
    detection), face-cropped at full size, with frame indices, boxes and detection flags.
    Raises ``VideoError`` when no clip has enough face."""
    dropped = []
    if len(video.clips) < opts.clips_per_video:
        dropped.append({"part": f"clips {len(video.clips)}-{opts.clips_per_video - 1}",
                        "reason": f"{video.n_frames} frames: room for {len(video.clips)} clip(s) of {_span_text(opts)}"})
    if len(video.clips[0]) < opts.frames:  # a short video kept (``keep_short``)
        dropped.append({"part": f"{opts.frames - len(video.clips[0])} of {opts.frames} frames",
                        "reason": f"short video: {video.n_frames} frame(s), {len(video.clips[0])} sampled"})
    samples = []
    for number, (clip, track) in enumerate(zip(video.clips, video.tracks)):
        detected = [i in track for i in clip]
        if sum(detected) < (1 if opts.frame_level else MIN_DETECTED * len(clip)):
            dropped.append({"part": f"clip {number}", "reason": f"face found on {sum(detected)} of {len(clip)} frame(s)"})
            continue
        boxes = [[round(v, 1) for v in box] for box in smooth(fill_boxes(clip, track))]
        crops = [crop_face(video.frames[i], box, opts.margin) for i, box in zip(clip, boxes)]
        common = {"clip": number, "fps": round(video.fps, 3), "video_frames": video.n_frames}
        if not opts.frame_level:
            samples.append(Sample(f"-c{number:03d}", crops, {**common, "frames": clip, "boxes": boxes, "detected": detected}))
            continue
        for i, box, crop, found in zip(clip, boxes, crops, detected):
            if found:
                samples.append(Sample(f"-f{i:06d}", crop, {**common, "frame": i, "frames": [i], "boxes": [box],
                                                           "detected": [True]}))
            else:
                dropped.append({"part": f"frame {i}", "reason": "no face detected"})
    if not samples:
        raise VideoError(f"no {'frame' if opts.frame_level else 'clip'} with a face on enough frames "
                         f"({', '.join(d['reason'] for d in dropped[-3:])})")
    return Expanded(samples, dropped)


def video_samples(path: str, opts: VideoOptions) -> Expanded:
    """A video's samples (what a ``videos:PATH`` item's ``load`` returns), each clip with its
    sound when ``opts.audio`` (``data.audio.attach_audio``)."""
    video = video_faces(path, opts)
    expanded = cut_samples(video, opts)
    if opts.audio:
        attach_audio(expanded.samples, path, video.fps, opts.audio_format)
    return expanded


# ------------------------------------------------------------------------ recorded settings


def video_settings(sets: list[str]) -> dict[str, Any] | None:
    """The video settings (``VideoOptions.settings``) of the first of these shard sets that was
    made from videos; ``None`` when none was."""
    for folder in sets:
        video = load_manifest(folder).get("preprocessing", {}).get("video")
        if video:
            return video
    return None


def options_from_settings(settings: dict[str, Any] | None, **overrides: Any) -> VideoOptions:
    """``VideoOptions`` equal to recorded ``settings`` (a DNN detector's model file must still be
    where it was, or be given again in ``overrides``), then ``overrides`` (None values ignored)."""
    settings = settings or {}
    fields = {k: v for k, v in settings.items() if k in VideoOptions.__dataclass_fields__}
    detector = settings.get("face_detector", {})
    if detector.get("kind") == "dnn":
        fields.update(face_model=detector.get("model"), face_config=detector.get("config"))
    return VideoOptions(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})
