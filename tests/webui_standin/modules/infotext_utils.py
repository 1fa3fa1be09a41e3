"""modules/infotext_utils.py: quote/unquote and parse_generation_parameters (styles, old-hires and
version back-compat fix-ups left out). The UI's paste button and the API's png-info call
parse_generation_parameters(text) and then script_callbacks.infotext_pasted_callback(text, params)."""
import json
import re

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields: list = None):
    from modules import shared
    if skip_fields is None:
        skip_fields = shared.opts.infotext_skip_pasting
    res = {}
    prompt = negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    res.setdefault("Clip skip", "1")
    for key, default in (("Hires resize-1", 0), ("Hires resize-2", 0), ("Hires sampler", "Use same sampler"),
                         ("Hires checkpoint", "Use same checkpoint"), ("Hires prompt", ""), ("Hires negative prompt", ""),
                         ("RNG", "GPU"), ("Schedule type", "Automatic"), ("VAE Encoder", "Full"), ("VAE Decoder", "Full")):
        res.setdefault(key, default)
    for key in skip_fields:
        res.pop(key, None)
    return res


def get_override_settings(params, *, skip_fields=None):
    """[(infotext name, setting key, value)] for every setting (its OptionInfo's `infotext`) whose pasted value
    differs from the current one: what the paste button puts in the "Override settings" dropdown and the API's
    `infotext` field applies."""
    from modules import shared
    out = []
    for name, key in [(info.infotext, k) for k, info in shared.opts.data_labels.items() if info.infotext]:
        if name in (skip_fields or {}) or params.get(name) is None:
            continue
        value = shared.opts.cast_value(key, params[name])
        if value != getattr(shared.opts, key, None):
            out.append((name, key, value))
    return out
