"""Calling the chosen model: the routed call shared by every adapter and the server (binding, retries and
escalation), the cascade and its confidence signals, local generation, and answer extraction."""
