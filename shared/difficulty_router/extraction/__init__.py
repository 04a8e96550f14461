"""The small LM and its read-out: loading the representative model, prompting it, reading the hidden state
at the end of the prompt (lean prefill, prefix reuse, the numeric path chosen per machine) and caching the
features. Everything above works on the arrays it returns."""
