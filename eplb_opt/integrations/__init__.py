"""Drop-in policies for serving engines: :mod:`eplb_opt.integrations.vllm` and
:mod:`eplb_opt.integrations.sglang`.  Neither imports its engine unless asked."""
