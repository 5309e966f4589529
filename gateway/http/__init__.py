"""The public listener's own HTTP/1.1 server: requests, answers, connections."""
