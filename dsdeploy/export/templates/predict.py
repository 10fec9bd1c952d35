#!/usr/bin/env python3
"""Classify image files with the ONNX model in this bundle (standalone: onnxruntime, numpy, Pillow).

Usage: python predict.py IMAGE [IMAGE ...] [--top-k 5] [--model FILE] [--batch 16]

Reads manifest.json beside this script for the model file, input name and preprocessing
(resize/center-crop with Pillow bilinear, scale to [0,1], normalise by mean/std, NCHW)
and prints one JSON line per image: {"file", "top": [{"label", "index", "score"}...]}.
Scores are softmax probabilities of the model's output. Unreadable files print an
"error" line and make the exit status 1.
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
        if pre.get("resize") is None:
            im = im.resize((w, h), Image.BILINEAR)
        else:
            scale = pre["resize"] / min(im.size)
            nw, nh = max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
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
        sys.exit(f"error: manifest.json model must be a file name inside the bundle, got {name!r:.200}")
    path = os.path.join(HERE, name)
    if os.path.islink(path) or not os.path.isfile(path) \
            or os.path.dirname(os.path.realpath(path)) != os.path.realpath(HERE):
        sys.exit(f"error: the bundle's model {name} is missing or not a regular file inside {HERE}")
    want = (manifest.get("sha256") or {}).get(name) if isinstance(manifest.get("sha256"), dict) else None
    if not isinstance(want, str):
        sys.exit(f"error: manifest.json records no sha256 for {name}; cannot verify the model")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != want:
        sys.exit(f"error: {name} does not match the sha256 in manifest.json (the bundle was changed); refusing it")
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
    with open(os.path.join(HERE, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    pre = manifest["preprocessing"]
    if not pre:
        sys.exit("error: manifest.json has no preprocessing; cannot prepare images")
    labels = manifest.get("labels")
    model = args.model or bundle_model(manifest)  # --model: a file the person named; else only the bundle's own
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
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
        logits = np.asarray(sess.run(None, {inp.name: x})[0], np.float32)[:n].reshape(n, -1)
        probs = softmax(logits)
        k = max(1, min(args.top_k, probs.shape[1]))
        for (path, _), p in zip(chunk, probs):
            top = np.argsort(-p, kind="stable")[:k]
            print(json.dumps({"file": path, "top": [
                {"label": labels[i] if labels and i < len(labels) else str(int(i)), "index": int(i),
                 "score": round(float(p[i]), 6)} for i in top]}))
    return status


if __name__ == "__main__":
    sys.exit(main())
