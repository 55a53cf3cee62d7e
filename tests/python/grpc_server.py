"""A grpcio server for the mesh's gRPC scenarios, without generated code: methods of
`mesh.test.Echo` take and return raw bytes.

Prints `PORT <n>` once serving on 127.0.0.1, `STARTED Sleep` when a Sleep call begins, and
`CANCELLED Sleep` when its client went away (deadline or cancel) before it finished. Ends when
stdin closes.
"""
import sys
import time
from concurrent import futures

import grpc

SERVICE = "mesh.test.Echo"


def say(line):
    print(line, flush=True)


def unary(request, context):
    # b"status:<code>:<details>" answers with that status and binary trailing metadata.
    if request.startswith(b"status:"):
        _, code, details = request.decode().split(":", 2)
        context.set_trailing_metadata((("x-detail-bin", b"\x00\x01\xfe\xff"),))
        context.abort(grpc.StatusCode(_code(int(code))), details)
    return request


def _code(n):
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c.value
    raise ValueError(n)


def sleep(request, context):
    # Sleeps the given milliseconds unless the client goes away first.
    say("STARTED Sleep")
    deadline = time.monotonic() + int(request) / 1000
    while time.monotonic() < deadline:
        if not context.is_active():
            say("CANCELLED Sleep")
            return b""
        time.sleep(0.005)
    return b"slept"


def server_stream(request, context):
    # b"fail:<n>:<code>" sends n messages, then ends with that status in the trailers.
    if request.startswith(b"fail:"):
        _, n, code = request.decode().split(":")
        for i in range(int(n)):
            yield b"item-%d" % i
        context.abort(grpc.StatusCode(_code(int(code))), "failed after %s messages" % n)
    for i in range(int(request)):
        yield b"item-%d" % i


def client_stream(request_iterator, context):
    return b"|".join(request_iterator)


def bidi(request_iterator, context):
    for msg in request_iterator:
        yield b"echo:" + msg


def main():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say(f"PORT {port}")
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
