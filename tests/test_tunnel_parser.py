"""Reading the quick tunnel URL out of cloudflared's log output."""

from __future__ import annotations

import pytest

from inventiv.tunnel.cloudflared import (
    QuickTunnelURLParser,
    extract_quick_tunnel_url,
    is_tunnel_url,
    quick_tunnel_command,
    quick_tunnel_command_text,
)

# Verbatim start of `cloudflared tunnel --url 127.0.0.1:22` as reported in
# cloudflare/cloudflared#456 (cloudflared 2021.8): INF lines on stderr, the disclaimer carrying
# its own https link, then the box.
REAL_2021 = """\
2021-09-03T10:44:38Z INF Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to experiment and try it out. However, be aware that these account-less Tunnels have no uptime guarantee. If you intend to use Tunnels in production you should use a pre-created named tunnel by following: https://developers.cloudflare.com/cloudflare-one/connections/connect-apps
2021-09-03T10:44:38Z INF Requesting new quick Tunnel on trycloudflare.com...
2021-09-03T10:44:41Z INF +--------------------------------------------------------------------------------------------+
2021-09-03T10:44:41Z INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |
2021-09-03T10:44:41Z INF |  https://symantec-transferred-lock-revenues.trycloudflare.com                              |
2021-09-03T10:44:41Z INF +--------------------------------------------------------------------------------------------+
2021-09-03T10:44:41Z INF Cannot determine default configuration path. No file [config.yml config.yaml] in [~/.cloudflared ~/.cloudflare-warp ~/cloudflare-warp /etc/cloudflared /usr/local/etc/cloudflared]
"""  # noqa: E501

# Current releases: the disclaimer (cmd/cloudflared/tunnel/quick_tunnel.go) links the terms of
# use *before* the box; a parser taking the first https URL would publish Cloudflare's website.
CURRENT = """\
2025-01-28T06:13:30Z INF Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to experiment and try it out. However, be aware that these account-less Tunnels have no uptime guarantee, are subject to the Cloudflare Online Services Terms of Use (https://www.cloudflare.com/website-terms/), and Cloudflare reserves the right to investigate your use of Tunnels for violations of such terms. If you intend to use Tunnels in production you should use a pre-created named tunnel by following: https://developers.cloudflare.com/cloudflare-one/connections/connect-apps
2025-01-28T06:13:30Z INF Requesting new quick Tunnel on trycloudflare.com...
2025-01-28T06:13:34Z INF +--------------------------------------------------------------------------------------------+
2025-01-28T06:13:34Z INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |
2025-01-28T06:13:34Z INF |  https://four-dashed-word-url.trycloudflare.com                                            |
2025-01-28T06:13:34Z INF +--------------------------------------------------------------------------------------------+
2025-01-28T06:13:34Z INF Version 2025.1.0 (Checksum 8734f79dbdcb91e305fa48d837840c8c0d14f143ed390c516b86c2c292d9b368)
2025-01-28T06:13:34Z INF Settings: map[ha-connections:1 protocol:quic url:http://127.0.0.1:8003]
2025-01-28T06:13:35Z INF Registered tunnel connection connIndex=0 connection=5c94b68c-6732-40c1-9b49-9f8f6c23521d event=0 ip=198.41.192.67 location=las01 protocol=quic
"""  # noqa: E501

OFFLINE = """\
2025-01-28T06:13:30Z INF Requesting new quick Tunnel on trycloudflare.com...
2025-01-28T06:13:45Z ERR failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": dial tcp: lookup api.trycloudflare.com: no such host
"""  # noqa: E501


def test_real_cloudflared_output_gives_the_box_url() -> None:
    url = extract_quick_tunnel_url(REAL_2021.splitlines())
    assert url == "https://symantec-transferred-lock-revenues.trycloudflare.com"


def test_terms_of_use_link_before_the_box_is_not_taken() -> None:
    assert extract_quick_tunnel_url(CURRENT.splitlines()) == (
        "https://four-dashed-word-url.trycloudflare.com"
    )


def test_error_output_yields_no_url() -> None:
    assert extract_quick_tunnel_url(OFFLINE.splitlines()) is None


@pytest.mark.parametrize("host", ["127.0.0.1:44321", "localhost:44321"])
def test_loopback_url_in_the_box_is_accepted(host: str) -> None:
    """The test stand-in cannot serve *.trycloudflare.com, so it prints a loopback host."""
    lines = [
        "2025-01-28T06:13:34Z INF +----------+",
        "2025-01-28T06:13:34Z INF |  Your quick Tunnel has been created! Visit it at:  |",
        f"2025-01-28T06:13:34Z INF |  https://{host}         |",
    ]
    assert extract_quick_tunnel_url(lines) == f"https://{host}"


def test_loopback_url_outside_the_box_is_ignored() -> None:
    lines = [
        "2025-01-28T06:13:34Z INF Starting metrics server on https://127.0.0.1:20241/metrics",
        "2025-01-28T06:13:34Z INF https://127.0.0.1:20241",
    ]
    assert extract_quick_tunnel_url(lines) is None


def test_bare_trycloudflare_url_without_the_box_is_accepted() -> None:
    """Fallback for a build that prints the URL on one line."""
    line = "2025-01-28T06:13:34Z INF Visit it at https://a-b-c-d.trycloudflare.com now"
    assert extract_quick_tunnel_url([line]) == "https://a-b-c-d.trycloudflare.com"


def test_parser_returns_the_url_once_fed_line_by_line() -> None:
    parser = QuickTunnelURLParser()
    found = [url for line in CURRENT.splitlines() if (url := parser.feed(line))]
    assert found == ["https://four-dashed-word-url.trycloudflare.com"]
    assert parser.url == found[0]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://a-b-c.trycloudflare.com", True),
        ("https://api.trycloudflare.com", False),
        ("http://a-b-c.trycloudflare.com", False),
        ("https://127.0.0.1:8443", True),
        ("https://example.com", False),
    ],
)
def test_is_tunnel_url(url: str, expected: bool) -> None:
    assert is_tunnel_url(url) is expected


def test_command_is_the_seeds() -> None:
    assert quick_tunnel_command("cloudflared", 18003) == [
        "cloudflared",
        "tunnel",
        "--url",
        "http://127.0.0.1:18003",
    ]
    assert quick_tunnel_command_text(8003) == "cloudflared tunnel --url http://127.0.0.1:8003"
