#!/usr/bin/env python3
"""Reference renderings of real chat templates, for crates/lw-engine/tests/templates.rs.

Renders every template of llama.cpp's collection (models/templates/*.jinja in
the llama-cpp-python source package) over a fixed set of conversations with
Python's jinja2, set up the way transformers' `apply_chat_template` sets it
up, and writes the outputs (or jinja2's error) with each template's sha256 to
tests/fixtures/templates/expected.json.

    python3 scripts/render_templates.py [LLAMA_CPP_SRC] [OUT]

LLAMA_CPP_SRC is the `vendor/llama.cpp` directory of the source package
(default: $LONGWRITER_LLAMA_CPP_SRC, else the one scripts/llama_cpp_setup.sh
unpacks). Needs only jinja2 (scripts/requirements-ref.txt pins it).
"""

import hashlib
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = Path.home() / ".cache/longwriter/llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
OUT = ROOT / "tests/fixtures/templates/expected.json"

# The clock strftime_now reads; the Rust test injects the same instant (UTC).
NOW = datetime(2024, 7, 26, 14, 5, 9)

# Special tokens by template-name prefix; everything else gets <s> and </s>.
SPECIAL_TOKENS = [
    ("meta-llama-Llama-3", "<|begin_of_text|>", "<|eot_id|>"),
    ("fireworks-ai-llama-3", "<|begin_of_text|>", "<|eot_id|>"),
    ("NousResearch-Hermes-", "<|begin_of_text|>", "<|im_end|>"),
    ("deepseek-ai-", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("llama-cpp-deepseek-r1", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("Qwen", "", "<|im_end|>"),
    ("google-gemma-", "<bos>", "<eos>"),
    ("microsoft-Phi-3.5", "<s>", "<|endoftext|>"),
    ("CohereForAI-", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    ("Cohere2MoE", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    ("HuggingFaceTB-SmolLM3", "", "<|im_end|>"),
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

SYSTEM_USER = [
    {"role": "system", "content": "You are a careful writer."},
    {"role": "user", "content": "Write one sentence about Zürich — in English, please."},
]
MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3+3?"},
]
# Earlier reasoning (which Qwen3-style templates cut), padding that
# templates trim, quotes and a backslash.
REASONING_HISTORY = [
    {"role": "system", "content": "  Answer briefly.\n"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n2+2 is 4."},
    {"role": "user", "content": 'Quote "it", add a \\ backslash, then: 3+3?'},
]
PREFILL = [
    {"role": "user", "content": "Write a haiku about the sea."},
    {"role": "assistant", "content": "Waves fold"},
]


def case(messages, add_generation_prompt, tools=None, **kwargs):
    return {
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "tools": tools,
        "kwargs": kwargs,
    }


# Every template renders the first seven; the rest where the template reads
# the variable (`needs`).
CASES = {
    "system_user": case(SYSTEM_USER, False),
    "system_user+gen": case(SYSTEM_USER, True),
    "multi_turn": case(MULTI_TURN, False),
    "multi_turn+gen": case(MULTI_TURN, True),
    "prefill": case(PREFILL, False),
    "prefill+gen": case(PREFILL, True),
    "reasoning_history+gen": case(REASONING_HISTORY, True),
    "system_user+gen+no_thinking": case(SYSTEM_USER, True, enable_thinking=False),
    "multi_turn+gen+no_thinking": case(MULTI_TURN, True, enable_thinking=False),
    "tools+gen": case(SYSTEM_USER, True, tools=TOOLS),
}
NEEDS = {
    "system_user+gen+no_thinking": "enable_thinking",
    "multi_turn+gen+no_thinking": "enable_thinking",
    "tools+gen": "tools",
}

# Small templates, one Python-ism each, rendered over PROBE_CONTEXT: they
# pin down how values print, which filters exist, what fails. No source
# package needed, so the Rust side checks them everywhere.
PROBE_CONTEXT = {
    "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
    "d": {"k": "v", "é": [1, 2.5, None, True]},
}
PROBES = {
    "none_and_bools": "{{ none }}|{{ true }}|{{ false }}|{{ x }}|{{ [1, none, 'a', \"b'c\"] }}|{{ {'k': true, 'n': 1.5} }}",
    "concat_bools": "{{ 'a' ~ true ~ none ~ 1.0 }}",
    "string_filter": "{{ none|string }}{{ true|string }}{{ [1]|string }}",
    "tojson_options": "{{ d|tojson }}|{{ d|tojson(indent=2) }}|{{ d|tojson(separators=(',', ':')) }}"
    "|{{ d|tojson(sort_keys=true) }}|{{ d|tojson(ensure_ascii=true) }}",
    "tojson_generator": "{{ messages|map(attribute='role')|tojson }}",
    "tojson_undefined": "{{ x|tojson }}",
    "loop_none": "{% for x in none %}x{% endfor %}",
    "generator_length": "{{ messages|selectattr('role', 'equalto', 'user')|length }}",
    "generator_list": "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}"
    "{{ messages|map(attribute='role')|join(',') }}",
    "generator_is_true": "{% if messages|selectattr('role', 'equalto', 'nobody') %}truthy{% endif %}",
    "namespace_loop": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ loop.index }}{{ loop.previtem.role if loop.previtem is defined }}{% if loop.last %}!{% endif %}"
    "{% endfor %}{{ ns.n }}",
    "loop_controls": "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}"
    "{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}",
    "string_methods": "{{ '  a,b '.strip().split(',') }}{{ 'abc'.startswith('a') }}{{ 'x{}y'.format(1) }}"
    "{{ 'hello world'.title() }}{{ 'aXa'.lstrip('a').rstrip('a') }}{{ 'a-b'.replace('-', '+') }}"
    "{{ 'a  b'.split() }}{{ 'a,b,,c'.split(',', 1) }}{{ 'ab'.upper() }}{{ 'x'.endswith(('y', 'x')) }}",
    "dict_methods": "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{{ d.get('zz', 'dflt') }}{{ d.keys()|list }}",
    "filters": "{{ [3, 1, 2]|sort }}{{ 'ab\ncd'|indent(2) }}{{ ' x '|trim }}{{ [1, 2, 2]|unique|list }}"
    "{{ 'abc'|upper }}{{ [1, 2]|min }}{{ 'hELLO'|capitalize }}{{ 'a b'|title }}{{ 'aaa'|replace('a', 'b', 2) }}",
    "default_filter": "{{ x|default('d') }}{{ none|default('d') }}{{ none|default('d', true) }}{{ ''|default('e', true) }}",
    "length_first_last": "{{ d|length }}{{ 'héllo'|length }}{{ messages|first }}{{ [1, 2]|last }}",
    "numbers": "{{ 7 // 2 }}{{ 7 / 2 }}{{ 7 % 3 }}{{ 2 ** 3 }}{{ '-' * 3 }}{{ 1.0 }}{{ 1e20 }}{{ '42'|int + 1 }}{{ 3|float }}",
    "is_tests": "{{ none is iterable }}{{ 'a' is iterable }}{{ d is mapping }}{{ [1] is sequence }}{{ 'a' is string }}"
    "{{ 1 is number }}{{ x is defined }}{{ true is boolean }}{{ 1.5 is float }}{{ none is none }}",
    "slicing": "{{ messages[1:]|length }}{{ 'abcdef'[::-1] }}{{ 'abc'[-1] }}{{ [1, 2, 3][:2] }}",
    "in_operator": "{{ 'a' in 'abc' }}{{ 'k' in d }}{{ 1 in [1] }}{{ 'z' not in d }}",
    "macro_set_filter_blocks": "{% macro f(a, b='z') %}{{ a }}{{ b }}{% endmacro %}{{ f(1) }}{{ f(2, b=3) }}"
    "{% set y %}in{{ 1 }}{% endset %}{{ y|upper }}{% filter upper %}abc{% endfilter %}",
    "whitespace": "  {% if true %}\n  x\n  {% endif %}\na  {%- if true -%}  b  {%- endif -%}  c {{- ' d ' -}} e\n"
    "{# c #}\n{#- c -#}\nz",
    "generation_tag": "a\n{% generation %}\nb\n{%- endgeneration %}\nc",
    "strftime": "{{ strftime_now('%Y-%m-%d %d %b %B %A %a %H:%M:%S %j %y %m') }}",
    "raise": "{{ raise_exception('no ' ~ 'way') }}",
    "undefined_attr": "{{ x.y }}",
    "list_append": "{% set l = [] %}{{ l.append(1) }}",
    "unknown_filter": "{% if false %}{{ x|from_json }}{% endif %}ok",
}


class Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}` tag: renders its body unchanged (it
    only records where assistant text lies)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return NOW.strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def special_tokens(name):
    for prefix, bos, eos in SPECIAL_TOKENS:
        if name.startswith(prefix):
            return bos, eos
    return "<s>", "</s>"


def error(e):
    return {"error": f"{type(e).__name__}: {e}"}


def render_all(env, name, source):
    bos, eos = special_tokens(name)
    outputs = {}
    try:
        template = env.from_string(source)
    except Exception as e:  # a template jinja2 cannot compile fails every case
        return bos, eos, {c: error(e) for c in CASES if NEEDS.get(c, "") in source}
    for c, spec in CASES.items():
        if NEEDS.get(c, "") not in source:
            continue
        try:
            outputs[c] = template.render(
                messages=spec["messages"],
                add_generation_prompt=spec["add_generation_prompt"],
                tools=spec["tools"],
                documents=None,
                bos_token=bos,
                eos_token=eos,
                **spec["kwargs"],
            )
        except Exception as e:
            outputs[c] = error(e)
    return bos, eos, outputs


def render_probes(env):
    outputs = {}
    for name, source in PROBES.items():
        try:
            output = env.from_string(source).render(**PROBE_CONTEXT)
        except Exception as e:
            output = error(e)
        outputs[name] = {"source": source, "output": output}
    return outputs


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LONGWRITER_LLAMA_CPP_SRC", DEFAULT_SRC))
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT
    paths = sorted((src / "models/templates").glob("*.jinja"))
    if not paths:
        sys.exit(f"no templates under {src / 'models/templates'}")
    env = environment()
    templates = {}
    for path in paths:
        raw = path.read_bytes()
        bos, eos, outputs = render_all(env, path.stem, raw.decode("utf-8"))
        templates[path.stem] = {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "bos_token": bos,
            "eos_token": eos,
            "outputs": outputs,
        }
    doc = {
        "generator": "scripts/render_templates.py",
        "jinja2": jinja2.__version__,
        "source": "llama-cpp-python 0.3.36, vendor/llama.cpp/models/templates",
        "now": NOW.isoformat(),
        "cases": CASES,
        "templates": templates,
        "probe_context": PROBE_CONTEXT,
        "probes": render_probes(env),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    errors = sum(isinstance(o, dict) for t in templates.values() for o in t["outputs"].values())
    total = sum(len(t["outputs"]) for t in templates.values())
    print(f"{len(templates)} templates, {total} renderings ({errors} errors) -> {out}")


if __name__ == "__main__":
    main()
