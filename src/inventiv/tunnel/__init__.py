"""Public reachability: run cloudflared for this stack's API port, publish its URL, diagnose.

Workers live on remote machines and can only reach the control plane through a public https
URL; everything here exists so that URL is always the right one, and so that when it is not,
the operator is told exactly what to type.
"""
