/*
 * abstream-openloop: the fixed-rate (open loop) HTTP/1.1 load client of `abstream bench`, in C.
 *
 * The same schedule and accounting as the asyncio client in http_client.py (which stays as the fallback when no
 * C compiler is around), at about a third of its CPU per request: on the 2-core box the load client shares
 * the cores with the gateway and the broker, so every microsecond it spends is taken from what it measures.
 *
 * Request k is due at start + k / rate. Every tick (1 ms, or sooner when the next request is due) the client
 * releases the requests due within half a tick onto idle keep-alive connections; when none is idle it opens
 * another (up to max_connections), as many independent clients would. Latency is counted from the scheduled
 * time (from the actual send when a request left up to half a tick early), so a stalled server cannot hide
 * its queue by slowing the client down (no coordinated omission).
 *
 * usage: abstream-openloop HOST PORT REQUESTS RATE DURATION WARMUP CONNECTIONS MAX_CONNECTIONS SAMPLES
 *   REQUESTS  file of complete HTTP requests, each as "<length>\n<bytes>" (loadgen.write_pool)
 *   SAMPLES   written: one (latency, service, lateness) triple of doubles, in ms, per measured request
 * stdout: one JSON object with the counts; loadgen.py turns both into the same summary as its own client.
 * Responses must carry Content-Length (the gateway's always do).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TICK_S 0.001
#define DRAIN_S 15.0
#define MAX_ERRORS 5

typedef struct {
    const char *data;
    size_t len;
} request_t;

typedef struct {
    int fd;
    int connecting;
    int busy;
    int closing; /* the last response said "Connection: close": drop the connection, do not reuse it */
    const request_t *req;
    size_t written;
    double scheduled, sent;
    char *buf;
    size_t used, cap;
} conn_t;

static request_t *requests;
static size_t n_requests, next_request;
static int n_open, n_opened, n_connecting, max_conns; /* open now (connecting included), opened in all */
static conn_t **idle; /* FIFO ring: the longest-idle connection is used first, so none idles into the server's
                         keep-alive timeout (a stack would leave the bottom ones idle for good) */
static int idle_head, n_idle;
static double *pending;
static size_t pending_head, pending_tail;
static long in_flight;
static double measure_from, measure_until;
static double *samples;
static size_t n_samples;
static long statuses[600];
static long other_status, accepted, duplicates, queued;
static double first_done, last_done;
static int stopping, failed;
static char errors[MAX_ERRORS][160];
static int n_errors;
static int epfd;
static struct sockaddr_storage addr;
static socklen_t addrlen;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void error(const char *what, int err) {
    if (n_errors < MAX_ERRORS)
        snprintf(errors[n_errors], sizeof errors[0], "%s: %s", what, err ? strerror(err) : "failed");
    n_errors++;
}

static void die(const char *what) {
    fprintf(stderr, "abstream-openloop: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void load_requests(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *all = malloc((size_t)size + 1);
    if (!all || fread(all, 1, (size_t)size, f) != (size_t)size) die("reading the requests");
    fclose(f);
    size_t cap = 1024;
    requests = malloc(cap * sizeof *requests);
    char *p = all, *end = all + size;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) break;
        size_t len = strtoul(p, NULL, 10);
        p = nl + 1;
        if (len > (size_t)(end - p)) break;
        if (n_requests == cap) requests = realloc(requests, (cap *= 2) * sizeof *requests);
        requests[n_requests].data = p;
        requests[n_requests].len = len;
        n_requests++;
        p += len;
    }
    if (n_requests == 0) {
        fprintf(stderr, "abstream-openloop: no request in %s\n", path);
        exit(2);
    }
}

static void idle_push(conn_t *c) { idle[(idle_head + n_idle++) % max_conns] = c; }

static conn_t *idle_pop(void) {
    conn_t *c = idle[idle_head];
    idle_head = (idle_head + 1) % max_conns;
    n_idle--;
    return c;
}

static void idle_remove(conn_t *c) {
    int kept = 0;
    for (int j = 0; j < n_idle; j++) {
        conn_t *x = idle[(idle_head + j) % max_conns];
        if (x != c) idle[(idle_head + kept++) % max_conns] = x;
    }
    n_idle = kept;
}

static void close_connection(conn_t *c) {
    close(c->fd); /* also leaves the epoll set */
    free(c->buf);
    free(c);
    n_open--;
}

static void watch(conn_t *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void open_connection(void) {
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conn_t *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->cap = 64 * 1024;
    c->buf = malloc(c->cap);
    n_open++;
    n_opened++;
    if (connect(fd, (struct sockaddr *)&addr, addrlen) == 0) {
        watch(c, EPOLL_CTL_ADD, EPOLLIN);
        idle_push(c);
        return;
    }
    if (errno != EINPROGRESS) die("connect");
    c->connecting = 1;
    n_connecting++;
    watch(c, EPOLL_CTL_ADD, EPOLLOUT);
}

static void write_some(conn_t *c) {
    while (c->written < c->req->len) {
        ssize_t n = send(c->fd, c->req->data + c->written, c->req->len - c->written, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
                return;
            }
            error("send", errno);
            stopping = failed = 1;
            return;
        }
        c->written += (size_t)n;
    }
    watch(c, EPOLL_CTL_MOD, EPOLLIN);
}

static void send_request(conn_t *c, double scheduled) {
    c->req = &requests[next_request];
    next_request = (next_request + 1) % n_requests;
    c->written = 0;
    c->busy = 1;
    c->scheduled = scheduled;
    c->sent = now_s();
    in_flight++;
    write_some(c);
}

static void pump(void) {
    while (pending_head < pending_tail && n_idle > 0) send_request(idle_pop(), pending[pending_head++]);
    long want = (long)(pending_tail - pending_head) - n_connecting;
    long room = (long)max_conns - n_open;
    if (want > room) want = room;
    for (long i = 0; i < want; i++) open_connection();
}

static long int_after(const char *body, size_t len, const char *marker) {
    const char *at = memmem(body, len, marker, strlen(marker));
    if (!at) return 0;
    return strtol(at + strlen(marker), NULL, 10);
}

static void done(conn_t *c, int status, const char *body, size_t body_len) {
    double now = now_s();
    in_flight--;
    c->busy = 0;
    if (c->scheduled >= measure_from && c->scheduled < measure_until) {
        double from = c->scheduled < c->sent ? c->scheduled : c->sent;
        double *s = &samples[3 * n_samples++];
        s[0] = (now - from) * 1000;
        s[1] = (now - c->sent) * 1000;
        s[2] = (c->sent - c->scheduled) * 1000;
        if (status >= 0 && status < 600)
            statuses[status]++;
        else
            other_status++;
        if (!first_done) first_done = now;
        last_done = now;
        if (status == 200) {
            accepted += int_after(body, body_len, "\"accepted\":");
            duplicates += int_after(body, body_len, "\"duplicates\":");
        }
    }
    idle_push(c);
}

/* Parse every complete response in the buffer; 0 when the run must fail, 2 when the server closes the
   connection after the answer just parsed (HTTP/1.1 "Connection: close"), else 1. */
static int parse(conn_t *c) {
    size_t at = 0;
    while (at < c->used) {
        char *start = c->buf + at;
        size_t avail = c->used - at;
        char *end = memmem(start, avail, "\r\n\r\n", 4);
        if (!end) break;
        size_t head_len = (size_t)(end - start);
        int status = avail > 12 ? atoi(start + 9) : 0;
        long length = -1;
        for (char *line = memchr(start, '\n', head_len); line && line < end; line = memchr(line + 1, '\n', (size_t)(end - line))) {
            size_t rest = (size_t)(end - line);
            if (rest > 16 && strncasecmp(line + 1, "content-length:", 15) == 0) {
                length = strtol(line + 16, NULL, 10);
            } else if (rest > 12 && strncasecmp(line + 1, "connection:", 11) == 0) {
                char *eol = memchr(line + 1, '\r', rest - 1);
                size_t value_len = (size_t)((eol ? eol : end) - (line + 12));
                c->closing = memmem(line + 12, value_len, "close", 5) != NULL;
            }
        }
        if (length < 0) {
            error("response without Content-Length", 0);
            return 0;
        }
        size_t total = head_len + 4 + (size_t)length;
        if (avail < total) break;
        if (!c->busy) {
            error("response to no request", 0);
            return 0;
        }
        done(c, status, end + 4, (size_t)length);
        at += total;
        if (c->closing) { /* the server closes it after this answer: sending another would meet a reset */
            idle_remove(c);
            return 2;
        }
    }
    if (at) {
        memmove(c->buf, c->buf + at, c->used - at);
        c->used -= at;
    }
    return 1;
}

static void readable(conn_t *c) {
    int lost = 0;
    for (;;) {
        if (c->used == c->cap) c->buf = realloc(c->buf, c->cap *= 2);
        ssize_t n = read(c->fd, c->buf + c->used, c->cap - c->used);
        if (n > 0) {
            c->used += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EAGAIN) break;
        lost = n < 0 ? errno : ECONNRESET;
        break;
    }
    int parsed = parse(c);
    if (!parsed) {
        stopping = failed = 1;
        return;
    }
    if (parsed == 2) {
        close_connection(c);
        return;
    }
    if (!lost) return;
    if (!c->busy) { /* the server closed an idle keep-alive connection: allowed, open another when needed */
        idle_remove(c);
        close_connection(c);
        return;
    }
    error("connection lost", lost);
    stopping = failed = 1;
}

static void resolve(const char *host, const char *port) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "abstream-openloop: %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(2);
    }
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr,
                "usage: %s HOST PORT REQUESTS RATE DURATION WARMUP CONNECTIONS MAX_CONNECTIONS SAMPLES\n",
                argv[0]);
        return 2;
    }
    resolve(argv[1], argv[2]);
    load_requests(argv[3]);
    double rate = atof(argv[4]), duration = atof(argv[5]), warmup = atof(argv[6]);
    int connections = atoi(argv[7]);
    max_conns = atoi(argv[8]);
    if (rate <= 0 || duration <= 0 || warmup < 0 || connections < 1 || max_conns < connections) {
        fprintf(stderr, "abstream-openloop: bad arguments\n");
        return 2;
    }
    size_t total = (size_t)(rate * (warmup + duration));
    idle = calloc((size_t)max_conns, sizeof *idle);
    pending = malloc((total + 1) * sizeof *pending);
    samples = malloc((total + 1) * 3 * sizeof *samples);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!idle || !pending || !samples || epfd < 0) die("setup");

    for (int i = 0; i < connections; i++) open_connection();
    struct epoll_event events[256];
    double connect_deadline = now_s() + 10;
    while (n_connecting > 0) {  /* every first connection is up before the clock starts */
        int n = epoll_wait(epfd, events, 256, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                errno = err;
                die("connect");
            }
            c->connecting = 0;
            n_connecting--;
            watch(c, EPOLL_CTL_MOD, EPOLLIN);
            idle_push(c);
        }
        if (now_s() > connect_deadline) {
            errno = ETIMEDOUT;
            die("connect");
        }
    }

    double start = now_s() + 0.02;
    measure_from = start + warmup;
    measure_until = measure_from + duration;
    double half_tick = TICK_S / 2, drain_deadline = 0;
    size_t i = 0;
    for (;;) {
        double now = now_s();
        if (i < total && !stopping) {
            double ahead = (now + half_tick - start) * rate; /* negative before the start: nothing due */
            size_t due = ahead < 0 ? 0 : (size_t)ahead + 1;
            if (due > total) due = total;
            if (due > i) {
                if (n_idle == 0) queued += (long)(due - i);
                for (; i < due; i++) pending[pending_tail++] = start + (double)i / rate;
                pump();
            }
        }
        if (i >= total || stopping) {
            if (!drain_deadline) drain_deadline = now + DRAIN_S;
            if ((in_flight == 0 && pending_head == pending_tail) || failed) break;
            if (now > drain_deadline) {
                char what[80];
                snprintf(what, sizeof what, "%ld requests unanswered after %.0f s",
                         in_flight + (long)(pending_tail - pending_head), DRAIN_S);
                error(what, 0);
                break;
            }
        }
        double wait = TICK_S;
        if (i < total) {
            double next = start + (double)i / rate - now - half_tick;
            if (next > wait) wait = next;
        }
        int n = epoll_wait(epfd, events, 256, (int)ceil(wait * 1000));
        for (int k = 0; k < n; k++) {
            conn_t *c = events[k].data.ptr;
            if (c->connecting) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                n_connecting--;
                c->connecting = 0;
                if (err) {
                    error("connect", err);
                    stopping = failed = 1;
                    continue;
                }
                watch(c, EPOLL_CTL_MOD, EPOLLIN);
                idle_push(c);
                pump();
                continue;
            }
            if ((events[k].events & EPOLLOUT) && c->busy && c->written < c->req->len) write_some(c);
            if (events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c);
        }
        if (n > 0) pump();
    }

    FILE *out = fopen(argv[9], "wb");
    if (!out || fwrite(samples, sizeof *samples, 3 * n_samples, out) != 3 * n_samples || fclose(out)) die(argv[9]);
    printf("{\"samples\":%zu,\"accepted\":%ld,\"duplicates\":%ld,\"queued\":%ld,\"connections_used\":%d,"
           "\"first_done\":%.9f,\"last_done\":%.9f,\"measure_from\":%.9f,\"other_status\":%ld,\"status\":{",
           n_samples, accepted, duplicates, queued, n_opened, first_done, last_done, measure_from, other_status);
    int first = 1;
    for (int s = 0; s < 600; s++)
        if (statuses[s]) {
            printf("%s\"%d\":%ld", first ? "" : ",", s, statuses[s]);
            first = 0;
        }
    printf("},\"errors\":%d,\"error_samples\":[", n_errors);
    for (int e = 0; e < n_errors && e < MAX_ERRORS; e++) printf("%s\"%s\"", e ? "," : "", errors[e]);
    printf("]}\n");
    return 0;
}
