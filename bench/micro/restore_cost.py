#!/usr/bin/env python3
"""Micro-benchmark (issue 12, local scale): iptables-nft-restore cost with Canal-shaped tables (own netns lsx-ipt, removed at the end)."""
import statistics
import subprocess
import sys
import time
NS = "lsx-ipt"
def sh(args, inp=None):
    return subprocess.run(["nsenter", f"--net=/run/netns/{NS}", *args], input=inp, text=True, capture_output=True, check=True)
def ep(i): return f"{i:012x}"
def full(n):
    out = ["*filter", ":CANAL-FROM-WL - [0:0]", ":CANAL-TO-WL - [0:0]"]
    out += [f":CANAL-FW-{ep(i)} - [0:0]" for i in range(n)] + [f":CANAL-TW-{ep(i)} - [0:0]" for i in range(n)]
    out += dispatch(n)
    for i in range(n):
        out += body(i)
    return "\n".join(out + ["COMMIT", ""])
def dispatch(n):
    return ([f"-A CANAL-FROM-WL -i cnl{ep(i)} -g CANAL-FW-{ep(i)}" for i in range(n)] + ["-A CANAL-FROM-WL -j DROP"] +
            [f"-A CANAL-TO-WL -o cnl{ep(i)} -g CANAL-TW-{ep(i)}" for i in range(n)] + ["-A CANAL-TO-WL -j DROP"])
def body(i):
    ip = f"100.64.{i // 250}.{i % 250 + 2}"
    return [f"-A CANAL-FW-{ep(i)} -j MARK --set-xmark 0x0/0x30000", f"-A CANAL-FW-{ep(i)} ! -s {ip}/32 -j DROP",
            f"-A CANAL-FW-{ep(i)} -j ACCEPT", f"-A CANAL-TW-{ep(i)} -j MARK --set-xmark 0x0/0x30000", f"-A CANAL-TW-{ep(i)} -j ACCEPT"]
def add_rewrite(n):  # what restore_text does today: new chains + dispatch chains flushed and rewritten
    out = ["*filter", f":CANAL-FW-{ep(n)} - [0:0]", f":CANAL-TW-{ep(n)} - [0:0]", ":CANAL-FROM-WL - [0:0]", ":CANAL-TO-WL - [0:0]",
           "-F CANAL-FROM-WL"] + [r for r in dispatch(n + 1) if "FROM-WL" in r] + ["-F CANAL-TO-WL"] + [r for r in dispatch(n + 1) if "TO-WL" in r]
    return "\n".join(out + body(n) + ["COMMIT", ""])
def add_insert(n):  # only the new rules: two -I into the dispatch chains
    out = ["*filter", f":CANAL-FW-{ep(n)} - [0:0]", f":CANAL-TW-{ep(n)} - [0:0]",
           f"-I CANAL-FROM-WL 1 -i cnl{ep(n)} -g CANAL-FW-{ep(n)}", f"-I CANAL-TO-WL 1 -o cnl{ep(n)} -g CANAL-TW-{ep(n)}"]
    return "\n".join(out + body(n) + ["COMMIT", ""])
def undo(n):
    return "\n".join(["*filter", f"-D CANAL-FROM-WL -i cnl{ep(n)} -g CANAL-FW-{ep(n)}", f"-D CANAL-TO-WL -o cnl{ep(n)} -g CANAL-TW-{ep(n)}",
                      f"-F CANAL-FW-{ep(n)}", f"-F CANAL-TW-{ep(n)}", f"-X CANAL-FW-{ep(n)}", f"-X CANAL-TW-{ep(n)}", "COMMIT", ""])
def timed(text):
    t = time.perf_counter()
    sh(["iptables-nft-restore", "--noflush", "--wait", "5"], text)
    return (time.perf_counter() - t) * 1000
subprocess.run(["ip", "netns", "add", NS], check=True)
try:
    for n in [int(x) for x in sys.argv[1].split(",")]:
        sh(["iptables-nft-restore"], "*filter\nCOMMIT\n")  # flush the table
        sh(["iptables-nft-restore", "--noflush"], full(n))
        res = {"noop": [], "rewrite": [], "insert": []}
        for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 7):
            res["noop"].append(timed("*filter\nCOMMIT\n"))
            res["rewrite"].append(timed(add_rewrite(n)))
            sh(["iptables-nft-restore", "--noflush"], undo(n))
            res["insert"].append(timed(add_insert(n)))
            sh(["iptables-nft-restore", "--noflush"], undo(n))
        rules = sum(1 for line in sh(["iptables-nft-save"]).stdout.splitlines() if line.startswith("-A"))
        print(f"N={n} rules={rules} " + "  ".join(f"{k} p50 {statistics.median(v):.1f} ms" for k, v in res.items()), flush=True)
finally:
    subprocess.run(["ip", "netns", "delete", NS])
