"""Tests against real servers on loopback (vLLM, llama.cpp server); marked `server`."""
