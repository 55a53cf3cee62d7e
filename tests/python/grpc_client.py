"""A grpcio client for the mesh's gRPC scenarios; prints one JSON object with what it saw.

    grpc_client.py ADDR AUTHORITY calls
        unary, server-streaming, client-streaming and bidi calls to mesh.test.Echo
    grpc_client.py ADDR AUTHORITY call METHOD PAYLOAD [TIMEOUT_S]
        one unary call: its code, details, trailing metadata and elapsed time
    grpc_client.py ADDR AUTHORITY burst METHOD PAYLOAD N
        N unary calls one after another: the list of their results
    grpc_client.py ADDR AUTHORITY stream PAYLOAD
        one server-streaming call: the messages it got and its final code

AUTHORITY is the `:authority` sent (the target's name); empty means the address itself.
"""
import json
import sys
import time

import grpc

SERVICE = "/mesh.test.Echo/"


def channel(addr, authority):
    options = [("grpc.default_authority", authority)] if authority else []
    # No retries or transparent retries hiding what the mesh answered.
    options.append(("grpc.enable_retries", 0))
    return grpc.insecure_channel(addr, options=options)


def calls(ch):
    unary = ch.unary_unary(SERVICE + "Unary")(b"hello", timeout=10)
    server = list(ch.unary_stream(SERVICE + "ServerStream")(b"3", timeout=10))
    client = ch.stream_unary(SERVICE + "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10)
    bidi = list(ch.stream_stream(SERVICE + "Bidi")(iter([b"x", b"y"]), timeout=10))
    return {
        "unary": unary.decode(),
        "server_stream": [m.decode() for m in server],
        "client_stream": client.decode(),
        "bidi": [m.decode() for m in bidi],
    }


def call(ch, method, payload, timeout):
    started = time.monotonic()
    out = {}
    try:
        reply, rpc = ch.unary_unary(SERVICE + method).with_call(payload.encode(), timeout=timeout)
        out["code"] = 0
        out["reply"] = reply.decode(errors="replace")
        trailing = rpc.trailing_metadata()
    except grpc.RpcError as e:
        out["code"] = e.code().value[0]
        out["details"] = e.details()
        trailing = e.trailing_metadata()
    out["elapsed_ms"] = (time.monotonic() - started) * 1000
    out["trailing"] = {
        k: (v.hex() if isinstance(v, bytes) else v) for k, v in (trailing or ())
    }
    return out


def stream(ch, payload, timeout):
    out = {"items": []}
    try:
        for msg in ch.unary_stream(SERVICE + "ServerStream")(payload.encode(), timeout=timeout):
            out["items"].append(msg.decode(errors="replace"))
        out["code"] = 0
    except grpc.RpcError as e:
        out["code"] = e.code().value[0]
        out["details"] = e.details()
    return out


def main():
    addr, authority, what = sys.argv[1:4]
    with channel(addr, authority) as ch:
        if what == "calls":
            out = calls(ch)
        elif what == "burst":
            method, payload, n = sys.argv[4:7]
            out = [call(ch, method, payload, 10) for _ in range(int(n))]
        elif what == "call":
            method, payload = sys.argv[4:6]
            timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 10
            out = call(ch, method, payload, timeout)
        elif what == "stream":
            payload = sys.argv[4]
            out = stream(ch, payload, 10)
        else:
            sys.exit(f"unknown scenario {what!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
