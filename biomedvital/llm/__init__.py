"""The OpenAI-compatible chat client, shared by every stage that asks a language model.

It knows no stage: it imports only :mod:`biomedvital.data` and :mod:`biomedvital.tracking`.
Modules are imported on use (``biomedvital.llm.online`` …) so that importing the package does
not pull in the ``openai`` client. One concept per module:

``keys``          request keys (the journal's cache key), costs, token estimates
``images``        image references in messages: hashed for keys, inlined when sent
``redact``        the API key and URL credentials masked out of what is written
``pacing``        token buckets for requests and tokens per minute
``errors``        what is retried, what fails an item, what stops the run
``response``      the parts of a reply that are kept; empty replies
``config``        :class:`ClientConfig` (the ``client`` block of every chat verb), the API key
``journal``       the request journal: resumable, offset-indexed, locked
``outcome``       :class:`ChatRequest`, :class:`Outcome`, :class:`Ledger`, :class:`FillResult`
``online``        :class:`ChatClient`: concurrency, pacing, retries, one pass over a stream
``batch``         :class:`BatchRunner`: OpenAI Batch API jobs, or a file for vLLM's runner
``runner``        ``fill_requests`` (online or batch) and ``run_requests`` (small batches)
``local_server``  ``local:NAME`` endpoints: llama-cpp-python's server on loopback
``llama_server``  the server process itself (``python -m biomedvital.llm.llama_server``)
``sampling``      :class:`SamplingArgs`: temperature, top_p, seed, max_tokens
``stage``         :class:`ChatStage`: the skeleton the chat verbs share (check, dry run, lock,
                  send, re-ask once, assemble, manifest)
"""
