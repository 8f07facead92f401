"""The official `openai` Python client against `longwriter serve`.

    python scripts/openai_client_check.py BASE_URL API_KEY MODEL

Lists models, runs a chat completion, the same request streamed (the deltas
must concatenate to the plain answer: same seed), the same request with a
stop string taken from its answer (cut exactly there), with other seeds
(some answer must differ), a text completion, and
error cases (unknown model, wrong key, a prompt beyond the context), each
raising the client's own exception types. Exits non-zero on any mismatch.
"""

import sys

import openai


def main() -> None:
    base, key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    assert model in ids, f"{model} not in {ids}"

    ask = dict(
        model=model,
        messages=[{"role": "user", "content": "Write two sentences about a river."}],
        max_tokens=24,
        temperature=1.0,
        top_p=0.9,
        seed=9,
    )
    plain = client.chat.completions.create(**ask)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion", plain.object
    assert plain.choices[0].finish_reason in ("stop", "length"), plain.choices[0].finish_reason
    assert plain.usage.completion_tokens > 0, plain.usage
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    deltas, usage, finish = [], None, None
    for chunk in client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(deltas) == text, ("".join(deltas), text)
    assert finish == plain.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage

    # A stop string known to occur in the unstopped text cuts it exactly at
    # its first occurrence (same seed, so the same text up to there).
    assert len(text) >= 12, f"answer too short to test stop strings: {text!r}"
    stop_at = text[8:12]
    stop = client.chat.completions.create(**dict(ask, stop=[stop_at]))
    want = text[: text.index(stop_at)]
    assert stop.choices[0].message.content == want, (stop.choices[0].message.content, want, stop_at)
    assert stop.choices[0].finish_reason == "stop", stop.choices[0].finish_reason

    # Seeds matter: at temperature 1 other seeds give other text (one of
    # three differing is enough; a server that ignores `seed` gives the same).
    others = [client.chat.completions.create(**dict(ask, seed=seed)).choices[0].message.content for seed in (10, 11, 12)]
    assert any(o != text for o in others), f"seeds 9-12 all gave {text!r}"

    comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert comp.object == "text_completion", comp.object
    assert comp.usage.completion_tokens == 6, comp.usage
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        ) if c.choices
    )
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

    try:
        client.chat.completions.create(**dict(ask, model="no-such-model"))
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and "no-such-model" in str(e), e

    try:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e

    try:
        client.chat.completions.create(**dict(ask, messages=[{"role": "user", "content": "word " * 40000}]))
        raise AssertionError("an over-long prompt was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.code == "context_length_exceeded", (e.status_code, e.code)

    print(f"openai {openai.__version__}: models, chat (plain, streamed, stop, seeds), completions, 3 error cases: all as expected")


if __name__ == "__main__":
    main()
