/*
 * The host side of kvmfast.bench_virtio's floor, and its host read for comparison.
 *
 *   eventfd_relay relay DOORBELL_FD IRQFD_FD REQUESTS
 *     Inherits a doorbell eventfd (a KVM ioeventfd, blocking) and an irqfd eventfd and
 *     loops read(doorbell) -> write(irqfd) until REQUESTS doorbells were read: the
 *     least a host can do between a guest's doorbell store and the guest's MSI. No
 *     queue, no I/O. Prints "ready" once it is about to read, so that the clock starts
 *     with the relay in place.
 *
 *   eventfd_relay pread PATH SIZE COUNT
 *     Times COUNT preads of SIZE bytes at offset 0 of PATH (after one untimed read that
 *     brings the page into the page cache, as the benchmark's device finds it) and
 *     prints {"ns_per_pread": N}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int relay(int doorbell, int irqfd, uint64_t requests)
{
	uint64_t seen = 0, count, one = 1;

	if (printf("ready\n") < 0 || fflush(stdout) != 0)
		return 1;
	while (seen < requests) {
		ssize_t got = read(doorbell, &count, sizeof(count));

		if (got < 0 && errno == EINTR)
			continue;
		if (got != (ssize_t)sizeof(count)) {
			perror("eventfd_relay: read(doorbell)");
			return 1;
		}
		seen += count;
		if (write(irqfd, &one, sizeof(one)) != (ssize_t)sizeof(one)) {
			perror("eventfd_relay: write(irqfd)");
			return 1;
		}
	}
	return 0;
}

static double now_ns(void)
{
	struct timespec at;

	clock_gettime(CLOCK_MONOTONIC, &at);
	return (double)at.tv_sec * 1e9 + (double)at.tv_nsec;
}

static int time_pread(const char *path, size_t size, long count)
{
	int fd = open(path, O_RDONLY);
	char *buffer = malloc(size);
	double start;

	if (fd < 0 || buffer == NULL) {
		perror("eventfd_relay: open");
		return 1;
	}
	if (pread(fd, buffer, size, 0) != (ssize_t)size) {
		perror("eventfd_relay: pread");
		return 1;
	}
	start = now_ns();
	for (long i = 0; i < count; i++) {
		if (pread(fd, buffer, size, 0) != (ssize_t)size) {
			perror("eventfd_relay: pread");
			return 1;
		}
	}
	printf("{\"ns_per_pread\": %.1f}\n", (now_ns() - start) / (double)count);
	free(buffer);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "relay") == 0)
		return relay(atoi(argv[2]), atoi(argv[3]), strtoull(argv[4], NULL, 10));
	if (argc == 5 && strcmp(argv[1], "pread") == 0)
		return time_pread(argv[2], strtoull(argv[3], NULL, 10), atol(argv[4]));
	fprintf(stderr,
		"usage: %s relay DOORBELL_FD IRQFD_FD REQUESTS | pread PATH SIZE COUNT\n",
		argv[0]);
	return 2;
}
