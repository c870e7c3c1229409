//! A simulated xenstored speaking the real wire protocol on unix sockets.
