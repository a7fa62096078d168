#!/usr/bin/env python3
"""llama.cpp's OpenAI-compatible server (llama-cpp-python's
``llama_cpp.server``) as tests/tests/llama_variant.rs runs it: the same
command-line flags, with the model's weights loaded without llama.cpp's CPU
"extra buffer types" (``llama_model_params.use_extra_bufts``: AMX tiles and
repacked weight layouts).

Why: on hosts with AMX (Sapphire Rapids and later) under a hypervisor that
does not grant the AMX tile state, llama.cpp 0.3.36's batched decode (any
prompt longer than one token) dies with SIGSEGV inside ``llama_decode``;
single-token decode works. Reproduce with ``Llama(...).create_chat_completion``
on the project's GGUF; the same call passes with ``use_extra_bufts = False``.
"""

import llama_cpp.llama_cpp as low_level

_default_params = low_level.llama_model_default_params


def _without_extra_buffer_types():
    params = _default_params()
    params.use_extra_bufts = False
    return params


low_level.llama_model_default_params = _without_extra_buffer_types

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    main()
