"""Rollout: the engine protocol (`engine`), the embedded HF engine (`hf_engine`, CPU default), the
SGLang engine (`sglang_engine` + `sglang_launch` + `sglang_server`; sglang itself is only needed by the servers) and
the actor -> engine weight resharding (`weight_sync`). Import the submodules directly."""
