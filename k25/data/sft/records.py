"""SFT conversations as records: OpenAI-style `messages` (+ optional `tools`) in JSONL, images as data URIs.

A record is `{"messages": [...], "tools": [...]}` (tools optional), the shape an OpenAI chat request has, so a
JSONL file of them is the SFT dataset format and every generated source writes the same records. An image is
an `image_url` part whose url is a `data:image/png;base64,...` URI or a file path (relative to the JSONL file);
`records_images` decodes them in order of appearance, which is the order the chat format expands their
placeholders in.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

Record = dict[str, Any]


def image_part(image: Any) -> dict[str, Any]:
    """An `image_url` part holding `image` (PIL image or uint8 array) as a PNG data URI."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                               .decode("ascii")}}


def decode_image(part: Mapping[str, Any], where: str, base_dir: str = "") -> np.ndarray:
    """The RGB uint8 array of an image part (data URI or a path, relative to `base_dir`)."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, Mapping) else url or part.get("image")
    if not isinstance(url, str):
        raise ValueError(f"{where}: an image part needs image_url.url (a data URI or a file path)")
    try:
        if url.startswith("data:"):
            _, _, data = url.partition(",")
            img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        else:
            img = Image.open(os.path.join(base_dir, url))
        return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None


def record_images(record: Mapping[str, Any], where: str = "record", base_dir: str = "") -> list[np.ndarray]:
    """Every image of a record's messages, in order of appearance (RGB uint8 arrays)."""
    out = []
    for i, m in enumerate(record["messages"]):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
                    out.append(decode_image(part, f"{where}.messages[{i}].content[{j}]", base_dir))
    return out


def check_record(record: Any, where: str) -> Record:
    """`record` if it is {"messages": [dict, ...], "tools"?: [dict, ...]}, else a ValueError naming `where`."""
    if not isinstance(record, Mapping) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError(f"{where}: an SFT record is a JSON object with a non-empty 'messages' list "
                         "(OpenAI chat format) and optional 'tools'")
    if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in record["messages"]):
        raise ValueError(f"{where}: the conversation has no assistant message, so nothing would be trained")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise ValueError(f"{where}: 'tools' must be a list of OpenAI function declarations")
    return dict(record)


def read_jsonl(path: str) -> list[Record]:
    """Records of a JSONL file (one conversation per line; blank lines skipped). Errors name path:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SFT data file {path!r} does not exist (config.data.sft_path)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(check_record(obj, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str) -> int:
    """Write records one per line (UTF-8); returns how many."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
