"""Peer servers for `tokenmill bench compare`: their build (install_llama_cpp.sh) and its probe (llama_probe)."""
