//! What passes between blkhotplug and blkbackd: XenStore node names and formats, and the device fd over a unix socket.
