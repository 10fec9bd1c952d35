#!/usr/bin/env python3
"""Classify image files with the ONNX model in this bundle (standalone: onnxruntime, numpy, Pillow).

Usage: python predict.py IMAGE [IMAGE ...] [--top-k 5] [--model FILE] [--batch 16]

Reads manifest.json beside this script for the model file, input name and preprocessing
(resize/center-crop with Pillow, bilinear unless "interpolation" says otherwise, scale to [0,1],
normalise by mean/std, NCHW)
and prints one JSON line per image: {"file", "top": [{"label", "index", "score"}...]}.
Scores are softmax probabilities of the model's output. Unreadable files print an
"error" line and make the exit status 1. A damaged bundle (manifest.json, model file,
preprocessing or labels that cannot be used) prints one "error: ..." line and exits 2.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


MODES = {1: "L", 3: "RGB", 4: "RGBA"}
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
MAX_SIDE = 4096


def fail(message):
    """End the run: one "error: ..." line on stderr, exit status 2."""
    print("error: " + " ".join(str(message).split())[:500], file=sys.stderr)
    sys.exit(2)


def _int(value):
    return type(value) is int


def _number(value):
    return type(value) in (int, float) and bool(np.isfinite(value))


def check_preprocessing(pre):
    """Fail unless ``pre`` is usable: size [H, W] ints in 1..4096, channels 1/3/4, optional resize
    int in 1..4096, mean and std numbers (or lists of 1 or ``channels`` numbers), finite, std > 0."""
    if not isinstance(pre, dict) or not pre:
        fail("manifest.json has no preprocessing object; cannot prepare images")
    size = pre.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_int(v) and 1 <= v <= MAX_SIDE for v in size)):
        fail(f"manifest.json preprocessing.size must be [height, width], ints in 1..{MAX_SIDE}, got {size!r:.100}")
    channels = pre.get("channels")
    if not (_int(channels) and channels in MODES):
        fail(f"manifest.json preprocessing.channels must be 1, 3 or 4, got {channels!r:.100}")
    resize = pre.get("resize")
    if resize is not None and not (_int(resize) and 1 <= resize <= MAX_SIDE):
        fail(f"manifest.json preprocessing.resize must be null or an int in 1..{MAX_SIDE}, got {resize!r:.100}")
    if pre.get("interpolation", "bilinear") not in RESAMPLE:
        fail(f"manifest.json preprocessing.interpolation must be one of {', '.join(RESAMPLE)}, "
             f"got {pre.get('interpolation')!r:.100}")
    for key in ("mean", "std"):
        value = pre.get(key)
        values = value if isinstance(value, list) else [value]
        if not (len(values) in (1, channels) and all(_number(v) for v in values)):
            fail(f"manifest.json preprocessing.{key} must be 1 or {channels} finite numbers, got {value!r:.100}")
        if key == "std" and not all(v > 0 for v in values):
            fail(f"manifest.json preprocessing.std must be > 0, got {value!r:.100}")


def read_manifest():
    """manifest.json beside this script as a dict (fails with one line when missing or not JSON)."""
    path = os.path.join(HERE, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"cannot read {path}: {type(exc).__name__}: {exc}")
    if not isinstance(manifest, dict):
        fail(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def check_labels(labels, count):
    """Fail unless ``labels`` is None or a list of strings with one per model output (``count``; None: unknown)."""
    if labels is None:
        return
    if not (isinstance(labels, list) and all(isinstance(v, str) for v in labels)):
        fail("manifest.json labels must be a list of strings")
    if count is not None and len(labels) != count:
        fail(f"manifest.json has {len(labels)} labels but the model has {count} outputs")


def open_session(model):
    """An onnxruntime CPU session for ``model`` (bytes or a path); fails with one line."""
    if isinstance(model, str) and not os.path.isfile(model):
        fail(f"model file {model} does not exist or is not a file")
    try:
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for unreadable models: one line
        fail(f"cannot load the model {model if isinstance(model, str) else 'of this bundle'}: "
             f"{type(exc).__name__}: {str(exc)[:300]}")


def to_8bit(im):
    """16-bit / 32-bit integer grayscale scaled by 255/65535, float in [0, 1] by 255 (as dsdeploy.data.datasets)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8), "L")
    return im


def load_image(path, pre):
    """Decode, resize (and center-crop) like dsdeploy.data.datasets; returns float32 CHW normalised."""
    h, w = pre["size"]
    with Image.open(path) as im:
        im = to_8bit(im).convert(MODES[int(pre["channels"])])
        resample = RESAMPLE[pre.get("interpolation", "bilinear")]
        if pre.get("resize") is None:
            im = im.resize((w, h), resample)
        else:
            scale = pre["resize"] / min(im.size)
            nw, nh = max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))
            im = im.resize((nw, nh), resample)
            left, top = (nw - w) // 2, (nh - h) // 2
            im = im.crop((left, top, left + w, top + h))
        arr = np.asarray(im, dtype=np.uint8)
    x = arr.astype(np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    c = pre["channels"]
    mean = np.broadcast_to(np.asarray(pre["mean"], np.float32), (c,)).reshape(c, 1, 1)
    std = np.broadcast_to(np.asarray(pre["std"], np.float32), (c,)).reshape(c, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def bundle_model(manifest):
    """The bytes of the bundle's own model file, verified against the sha256 in manifest.json.

    The manifest's model must be a plain file name inside this folder (no absolute path, no
    "..", no symlink); any other value, a missing digest or a mismatch ends the run with one line.
    """
    name = manifest.get("model")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name):
        fail(f"manifest.json model must be a file name inside the bundle, got {name!r:.200}")
    path = os.path.join(HERE, name)
    if os.path.islink(path) or not os.path.isfile(path) \
            or os.path.dirname(os.path.realpath(path)) != os.path.realpath(HERE):
        fail(f"the bundle's model {name} is missing or not a regular file inside {HERE}")
    want = (manifest.get("sha256") or {}).get(name) if isinstance(manifest.get("sha256"), dict) else None
    if not isinstance(want, str):
        fail(f"manifest.json records no sha256 for {name}; cannot verify the model")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != want:
        fail(f"{name} does not match the sha256 in manifest.json (the bundle was changed); refusing it")
    return data


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Classify images with this bundle's ONNX model.")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--model", default=None, help="model file (default: the manifest's)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    manifest = read_manifest()
    pre = manifest.get("preprocessing")
    check_preprocessing(pre)
    labels = manifest.get("labels")
    check_labels(labels, None)
    model = args.model or bundle_model(manifest)  # --model: a file the person named; else only the bundle's own
    sess = open_session(model)
    inp = sess.get_inputs()[0]
    want = [pre["channels"], *pre["size"]]
    got = list(inp.shape[1:])
    if len(got) != 3 or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
        fail(f"the model's input shape {inp.shape} does not take the manifest's preprocessing "
             f"(channels {want[0]}, size {want[1:]})")
    out_dim = sess.get_outputs()[0].shape[-1] if sess.get_outputs()[0].shape else None
    check_labels(labels, out_dim if isinstance(out_dim, int) else None)
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    batch = fixed_batch or max(1, args.batch)
    status = 0
    good = []
    for path in args.images:
        try:
            good.append((path, load_image(path, pre)))
        except (OSError, ValueError, SyntaxError) as exc:
            print(json.dumps({"file": path, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}))
            status = 1
    for start in range(0, len(good), batch):
        chunk = good[start:start + batch]
        x = np.stack([a for _, a in chunk])
        n = len(x)
        if fixed_batch and n < fixed_batch:
            x = np.concatenate([x, np.zeros((fixed_batch - n, *x.shape[1:]), np.float32)])
        try:
            logits = np.asarray(sess.run(None, {inp.name: x})[0], np.float32)[:n].reshape(n, -1)
        except Exception as exc:  # onnxruntime's own error types: one line
            fail(f"the model failed to run: {type(exc).__name__}: {str(exc)[:300]}")
        check_labels(labels, logits.shape[1])
        probs = softmax(logits)
        k = max(1, min(args.top_k, probs.shape[1]))
        for (path, _), p in zip(chunk, probs):
            top = np.argsort(-p, kind="stable")[:k]
            print(json.dumps({"file": path, "top": [
                {"label": labels[i] if labels else str(int(i)), "index": int(i),
                 "score": round(float(p[i]), 6)} for i in top]}))
    return status


if __name__ == "__main__":
    sys.exit(main())
