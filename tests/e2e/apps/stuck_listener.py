"""A TCP server that listens and never accepts, for the accept-queue end-to-end test
(test_metrics.py): every connection a client makes stays in the listening socket's accept
queue, so the queue length is exactly the number of clients connected.

    python stuck_listener.py --port P [--backlog 128]

Prints `listening on 127.0.0.1:P backlog N` once the socket listens, then sleeps until killed.
"""

import argparse
import socket
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=128)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(args.backlog)
    print(f"listening on {args.host}:{args.port} backlog {args.backlog}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
