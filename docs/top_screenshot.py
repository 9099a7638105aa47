"""Make docs/top.png from a real run of `tcplife-trace top` (as root, tmux and chromium installed):

    .venv/bin/python docs/top_screenshot.py [docs/top.png]

tmux runs `top` in an 80x24 terminal during a bounded loopback workload (three services for
15 s: one whose clients close first, one that aborts with a reset, a port where nothing listens,
a few connections held open); the screen is captured with its colours (capture-pane -e), drawn
by rich as SVG and photographed by headless Chromium.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD = r'''
import socket, struct, sys, time
def listener():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(128); s.settimeout(10); return s
web, db = listener(), listener()
dead = socket.socket(); dead.bind(("127.0.0.1", 0)); closed_port = dead.getsockname()[1]; dead.close()
def pair(ls):
    c = socket.create_connection(ls.getsockname(), timeout=10); a, _ = ls.accept(); a.settimeout(10); return c, a
held = [pair(web) for _ in range(6)]
end = time.monotonic() + 15
while time.monotonic() < end:
    for _ in range(8):
        c, a = pair(web); c.close(); a.recv(1); a.close()
    c, a = pair(db); a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); a.close(); c.close()
    try:
        socket.create_connection(("127.0.0.1", closed_port), timeout=1)
    except OSError:
        pass
    time.sleep(0.1)
for c, a in held:
    c.close(); a.close()
'''


def main(out: str) -> None:
    sock = f"tcplife-shot-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    tool = os.path.join(ROOT, ".venv", "bin", "tcplife-trace")
    subprocess.run(tmux + ["new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
                           f"{tool} top -4 --refresh 1; sleep 30"], check=True)
    try:
        time.sleep(5)
        work = subprocess.Popen([sys.executable, "-c", WORKLOAD])
        time.sleep(11)
        screen = subprocess.run(tmux + ["capture-pane", "-e", "-p", "-t", "top"], check=True,
                                capture_output=True, text=True).stdout
        subprocess.run(tmux + ["send-keys", "-t", "top", "q"], check=True)
        work.wait(timeout=30)
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
        where = os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", sock)
        if os.path.exists(where):
            os.unlink(where)
    from rich.console import Console
    from rich.text import Text
    console = Console(record=True, width=80, force_terminal=True, color_system="truecolor", file=open(os.devnull, "w"))
    console.print(Text.from_ansi(screen.rstrip("\n")))
    with tempfile.TemporaryDirectory() as tmp:
        svg = os.path.join(tmp, "top.svg")
        console.save_svg(svg, title="tcplife-trace top (80x24)")
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={os.path.abspath(out)}", "--window-size=1000,640",
                        "--default-background-color=00000000", f"file://{svg}"],
                       check=True, capture_output=True, timeout=60)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "top.png"))
