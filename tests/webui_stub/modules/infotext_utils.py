"""Stand-in for modules/infotext_utils.py: quoting, `parse_generation_parameters` (the real regex and rules for the
last line), and `paste_values`, which applies parsed values to a script's `infotext_fields` with the conversions of
the real `connect_paste.paste_func` (the component's current value decides the type; "False" for a checkbox is
False; a field whose value does not parse is left as it is)."""

from __future__ import annotations

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x):
    res = {}
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f'Error parsing "{k}: {v}"')
    return res


_KEEP = object()


def paste_values(paste_fields, params):
    """[(component, key)] -> the value each component gets (or _KEEP), as paste_func computes its gr.update()s."""
    out = []
    for component, key in paste_fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            out.append(_KEEP)
            continue
        try:
            valtype = type(component.value)
            if valtype == bool and v == "False":
                val = False
            elif valtype == int:
                val = float(v)
            else:
                val = valtype(v)
            out.append(val)
        except Exception:
            out.append(_KEEP)
    return out
