#!/usr/bin/env python3
"""Drives a running Breakwater gateway with the official OpenAI Python SDK, as a user would.

Usage:  python3 tests/sdk/openai_sdk.py BASE_URL MODEL [API_KEY]

BASE_URL is the gateway's traffic listener (e.g. http://127.0.0.1:8080); MODEL a model it
serves; API_KEY a tenant's key where the policy has them (`breakwater demo` prints three). Every call below must succeed (or fail with the SDK's exception type named); the
script prints one line per check and exits non-zero at the first failure. Every call has a
timeout and the SDK's own retries are off, so a hang or a retried error cannot hide.
"""
import io
import sys
import wave

import openai


def wav(seconds=1.0, rate=16000):
    """A small WAV file of silence, 16-bit mono."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * seconds))
    return out.getvalue()


def main():
    base, model = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else "unused"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, timeout=30, max_retries=0)
    checks = []

    def check(name, ok, detail=""):
        checks.append(name)
        print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
        if not ok:
            sys.exit(1)

    # Chat, plain and streamed with usage.
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    check("chat.completions.create", bool(chat.choices[0].message.content)
          and chat.usage.completion_tokens == 8, chat)
    parts, usage = [], None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count."}], max_tokens=6,
            stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    check("chat stream with usage", len(parts) == 6 and usage is not None
          and usage.completion_tokens == 6, (parts, usage))

    # Legacy completions, and n=2 handled by the engine.
    comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5)
    check("completions.create", bool(comp.choices[0].text) and comp.usage.completion_tokens == 5, comp)

    # Embeddings.
    emb = client.embeddings.create(model=model, input=["a harbour", "a breakwater"])
    check("embeddings.create", len(emb.data) == 2 and len(emb.data[0].embedding) > 0, emb)

    # Responses, plain and streamed (usage from response.completed).
    resp = client.responses.create(model=model, input="What is a breakwater?",
                                   instructions="One sentence.", max_output_tokens=9)
    check("responses.create", resp.status == "completed" and bool(resp.output_text)
          and resp.usage.output_tokens == 9, resp)
    deltas, completed = [], None
    with client.responses.stream(model=model, input="Stream a sentence.",
                                 max_output_tokens=7) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
    check("responses stream", len(deltas) == 7 and completed is not None
          and completed.usage.output_tokens == 7 and completed.output_text == "".join(deltas),
          (deltas, completed))
    events = [e.type for e in client.responses.create(model=model, input="hi",
                                                       max_output_tokens=2, stream=True)]
    check("responses stream events", events[0] == "response.created"
          and events[-1] == "response.completed", events)

    # Audio: a multipart form, routed by its `model` field.
    audio = wav()
    tr = client.audio.transcriptions.create(model=model, file=("speech.wav", audio, "audio/wav"))
    check("audio.transcriptions.create", bool(tr.text), tr)
    tl = client.audio.translations.create(model=model, file=("speech.wav", audio, "audio/wav"))
    check("audio.translations.create", bool(tl.text), tl)

    # Models.
    models = [m.id for m in client.models.list()]
    check("models.list", model in models, models)
    check("models.retrieve", client.models.retrieve(model).id == model)

    # Errors, as the SDK's exception types.
    try:
        client.models.retrieve("no-such-model")
        check("models.retrieve unknown -> NotFoundError", False, "no exception")
    except openai.NotFoundError:
        check("models.retrieve unknown -> NotFoundError", True)
    try:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "x"}])
        check("unknown model -> NotFoundError", False, "no exception")
    except openai.NotFoundError as e:
        check("unknown model -> NotFoundError", e.body.get("code") == "model_not_found", e.body)
    try:
        client.chat.completions.create(model=model, messages="not a list", max_tokens=-1)
        check("malformed body -> BadRequestError", False, "no exception")
    except openai.BadRequestError as e:
        check("malformed body -> BadRequestError", "max_tokens" in str(e), e)
    try:
        client.responses.create(model=model, input="x", max_output_tokens=-1)
        check("malformed responses body -> BadRequestError", False, "no exception")
    except openai.BadRequestError:
        check("malformed responses body -> BadRequestError", True)

    print(f"{len(checks)} checks passed with openai {openai.__version__}")


if __name__ == "__main__":
    main()
