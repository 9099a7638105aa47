/*
 * Native churn load for bench/churn.py: the fastest loopback connection churn this machine
 * makes (Python tops out at about half of it). Built at bench time with gcc.
 *
 *   loadgen SECONDS MAX_CONNS CLIENTS SERVERS [ADDR]
 *
 * SERVERS processes accept on one listener (ADDR, default 127.0.0.1, an ephemeral port),
 * read one byte and close: the server closes first. CLIENTS processes each loop
 * connect, write one byte, read until EOF, close, until SECONDS have passed or MAX_CONNS
 * connections were made between them. Every connection makes exactly 10 state changes
 * (client: CLOSE>SYN_SENT>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE; server child:
 * LISTEN>SYN_RECV>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE). Bounded in count and time.
 * Prints "PORT CONNS_PER_S CONNS_MADE ELAPSED_S" on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void serve(int ls, double stop_at)
{
	char b;
	while (now_s() < stop_at) {
		int c = accept(ls, NULL, NULL);
		if (c < 0)
			continue;
		(void)!read(c, &b, 1);
		close(c);
	}
}

/* one client: returns connections made; *failed counts connects that did not complete */
static uint64_t client(struct sockaddr_in *dst, double stop_at, int64_t *budget, uint64_t *failed)
{
	uint64_t made = 0;
	char b = 'x', r;
	while (now_s() < stop_at) {
		if (__atomic_sub_fetch(budget, 1, __ATOMIC_RELAXED) < 0)
			break; /* the shared budget ran out */
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0)
			break;
		if (connect(s, (struct sockaddr *)dst, sizeof(*dst)) != 0 || write(s, &b, 1) != 1) {
			*failed += 1;
			close(s);
			continue;
		}
		while (read(s, &r, 1) > 0)
			;
		close(s);
		made++;
	}
	return made;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: loadgen SECONDS MAX_CONNS CLIENTS SERVERS [ADDR]\n");
		return 2;
	}
	double seconds = atof(argv[1]);
	uint64_t max_conns = strtoull(argv[2], NULL, 10);
	int clients = atoi(argv[3]), servers = atoi(argv[4]);
	const char *addr = argc > 5 ? argv[5] : "127.0.0.1";
	if (seconds <= 0 || seconds > 3600 || clients < 1 || clients > 64 || servers < 1 || servers > 64) {
		fprintf(stderr, "loadgen: SECONDS in (0, 3600], CLIENTS and SERVERS in [1, 64]\n");
		return 2;
	}
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in sa = {.sin_family = AF_INET};
	inet_pton(AF_INET, addr, &sa.sin_addr);
	socklen_t len = sizeof(sa);
	if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(ls, 4096) != 0 ||
	    getsockname(ls, (struct sockaddr *)&sa, &len) != 0) {
		perror("loadgen: listen");
		return 1;
	}
	/* shared between the processes: the connection budget and each client's counts */
	uint64_t *shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shm == MAP_FAILED)
		return 1;
	int64_t *budget = (int64_t *)&shm[0];
	*budget = (int64_t)max_conns;
	double t0 = now_s(), stop_at = t0 + seconds;
	pid_t srv[64], cli[64];
	for (int i = 0; i < servers; i++)
		if ((srv[i] = fork()) == 0) {
			serve(ls, stop_at + 30);
			_exit(0);
		}
	for (int i = 0; i < clients; i++)
		if ((cli[i] = fork()) == 0) {
			uint64_t failed = 0;
			shm[1 + 2 * i] = client(&sa, stop_at, budget, &failed);
			shm[2 + 2 * i] = failed;
			_exit(0);
		}
	uint64_t made = 0, failed = 0;
	for (int i = 0; i < clients; i++) {
		waitpid(cli[i], NULL, 0);
		made += shm[1 + 2 * i];
		failed += shm[2 + 2 * i];
	}
	double elapsed = now_s() - t0;
	usleep(200000); /* the servers closed every connection before its client saw EOF */
	for (int i = 0; i < servers; i++) {
		kill(srv[i], SIGKILL);
		waitpid(srv[i], NULL, 0);
	}
	if (failed)
		fprintf(stderr, "loadgen: %llu connects failed\n", (unsigned long long)failed);
	printf("%u %.1f %llu %.3f\n", ntohs(sa.sin_port), made / elapsed, (unsigned long long)made, elapsed);
	return failed ? 1 : 0;
}
