"""Animated GIFs of evaluation episodes (needs pillow: ``pip install ppo_tbptt[video]``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

HEADER = 30  # pixels of text above each frame


def _require_pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont  # noqa: F401
    except ImportError:
        raise RuntimeError("writing a GIF needs pillow: pip install 'ppo_tbptt[video]' "
                           "(or pip install pillow)") from None
    return Image, ImageDraw, ImageFont


def upscale(img: np.ndarray, min_width: int = 336) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the image is at least ``min_width`` wide."""
    factor = max(1, -(-min_width // img.shape[1]))
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def annotate(img: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The image under a black strip holding ``lines`` of white text."""
    Image, ImageDraw, ImageFont = _require_pillow()
    h, w = img.shape[:2]
    canvas = Image.new("RGB", (w, h + HEADER), (0, 0, 0))
    canvas.paste(Image.fromarray(img), (0, HEADER))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, line in enumerate(lines[:2]):
        draw.text((4, 2 + 13 * i), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def episode_frames(frames: list, seeds: Sequence[int], min_width: int = 336) -> list[np.ndarray]:
    """Readable frames for recorded episodes: ``frames[e]`` is a list of ``(rgb, step, reward, return)``."""
    out = []
    for e, ep in enumerate(frames):
        seed = seeds[e] if e < len(seeds) else "?"
        last = len(ep) - 1
        for img, step, reward, ret in ep:
            end = "  (end)" if step == last and step > 0 else ""
            out.append(annotate(upscale(img, min_width), [
                f"episode {e + 1}/{len(frames)}  level seed {seed}",
                f"step {step}/{last}  reward {reward:+.2f}  return {ret:.2f}{end}"]))
    return out


def write_gif(images: Sequence[np.ndarray], path: str | Path, fps: float = 6.0) -> Path:
    """Write RGB frames ``[H, W, 3] uint8`` as a looping GIF. Returns the path."""
    Image, _, _ = _require_pillow()
    if not images:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = [Image.fromarray(np.asarray(im, np.uint8)) for im in images]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0,
                optimize=False, disposal=1)
    return path
